"""Metrics that know how to recompute themselves on resampled items, for bootstrap confidence intervals.

Small suites (tens of items) give noisy numbers; a gate reports the percentile interval of its metric over
item resamples so a reader can tell a real regression from noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], float]


@dataclass
class Metric:
    """A measured value and, where it is a function of per-item results, how to recompute it.

    `stat(indices)` evaluates the metric on the items at `indices` (drawn with replacement from range(n)).
    """

    value: float
    n: int = 0
    stat: Statistic | None = None

    def resample(self, draws: np.ndarray) -> np.ndarray:
        """The metric on each row of `draws` (shape resamples x n); NaN where it cannot be recomputed."""
        if self.stat is None or self.n == 0:
            return np.full(len(draws), np.nan)
        return np.array([self.stat(idx) for idx in draws], dtype=float)


def mean_metric(values: np.ndarray | list[float], scale: float = 1.0) -> Metric:
    """The mean of per-item values (times `scale`, e.g. 100 for a percentage)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return Metric(float("nan"))
    return Metric(float(arr.mean() * scale), arr.size, lambda idx: float(arr[idx].mean() * scale))


def ratio_metric(
    numer: np.ndarray | list[float],
    denom: np.ndarray | list[float],
    transform: Callable[[float], float] = float,
) -> Metric:
    """transform(sum(numer) / sum(denom)) over items, e.g. a token-weighted loss or its perplexity."""
    num, den = np.asarray(numer, dtype=float), np.asarray(denom, dtype=float)

    def stat(idx: np.ndarray) -> float:
        total = den[idx].sum()
        return transform(float(num[idx].sum() / total)) if total else float("nan")

    if num.size == 0:
        return Metric(float("nan"))
    return Metric(stat(np.arange(num.size)), num.size, stat)


def draws(n: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Index resamples with replacement, shared by paired metrics so their differences stay paired."""
    return rng.integers(0, n, size=(samples, n))


def interval(values: np.ndarray, confidence: float) -> tuple[float, float] | None:
    """Percentile interval of bootstrap values, None when there were none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)
