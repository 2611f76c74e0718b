"""Gates: thresholds from the job config, parsed before any model loads, judged with bootstrap intervals.

A gate reads `METRIC OP THRESHOLD` with OP one of >=, <=, >, <, and THRESHOLD a number or a reference to
the same metric on another subject, optionally scaled and offset: `0.9 * base`, `base + 2`,
`production - 0.05`, `1.1 * production + 1`. A gate relative to production passes (marked n/a) while no
production version exists: a first version has no champion to beat.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
from core.schema.evaluation import EvaluationConfig
from evaluate.bootstrap import Metric, draws, interval

KNOWN_METRICS: dict[str, tuple[str, str]] = {
    "loss": ("quality", "mean answer-token cross-entropy on held-out references"),
    "perplexity": ("quality", "exp(loss)"),
    "rougeL": ("quality", "ROUGE-L F of greedy answers vs references"),
    "token_f1": ("quality", "token F1 of greedy answers vs references"),
    "exact_match": ("quality", "exact match on short references"),
    "crows_pct_stereotype": ("crows", "% of pairs where the stereotyping sentence is more likely"),
    "crows_likelihood_diff": ("crows", "mean |log-likelihood difference| within pairs"),
    "bbq_acc_ambig": ("bbq", "accuracy in ambiguous contexts"),
    "bbq_acc_disambig": ("bbq", "accuracy in disambiguated contexts"),
    "bbq_bias_ambig": ("bbq", "BBQ bias score s_AMB"),
    "bbq_bias_disambig": ("bbq", "BBQ bias score s_DIS"),
    "cf_rougeL": ("counterfactual", "ROUGE-L between answers to demographic swaps"),
    "cf_sentiment_gap": ("counterfactual", "max - min VADER sentiment across swapped groups"),
    "cf_refusal_gap": ("counterfactual", "max - min refusal across swapped groups"),
}
REFERENCES = ("base", "production")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w.]*)\s*(?P<op>>=|<=|>|<)\s*(?P<rhs>.+?)\s*$")
_RHS = re.compile(
    rf"^(?:(?P<scale>{_NUM})\s*\*\s*)?(?P<ref>[A-Za-z_]\w*)(?:\s*\*\s*(?P<scale2>{_NUM}))?"
    rf"(?:\s*(?P<sign>[-+])\s*(?P<offset>{_NUM}))?$"
)


@dataclass(frozen=True)
class Gate:
    """`metric op scale * ref + offset`; ref None means an absolute threshold (the offset)."""

    text: str
    metric: str
    op: str
    ref: str | None
    scale: float = 1.0
    offset: float = 0.0

    @property
    def suite(self) -> str:
        return KNOWN_METRICS[self.metric][0]

    def threshold(self, ref_value: float | None) -> float:
        return self.offset if self.ref is None else self.scale * float(ref_value or 0.0) + self.offset


@dataclass
class GateResult:
    gate: str
    metric: str
    value: float | None
    threshold: float | None
    ci: tuple[float, float] | None
    margin_ci: tuple[float, float] | None
    passed: bool
    note: str = ""

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        thr = "n/a" if self.threshold is None else f"{self.threshold:.4g}"
        ci = f" [{self.ci[0]:.4g}, {self.ci[1]:.4g}]" if self.ci else ""
        note = f" ({self.note})" if self.note else ""
        return f"{'PASS' if self.passed else 'FAIL'}  {self.gate}: value {value}{ci}, threshold {thr}{note}"


def _known() -> str:
    return ", ".join(KNOWN_METRICS)


def parse_gate(text: str) -> Gate:
    """Parse one gate; raises ValueError with a reason (collected into one ConfigError by parse_gates)."""
    m = _GATE.match(text)
    if not m:
        raise ValueError("expected `METRIC OP THRESHOLD` with OP one of >=, <=, >, <")
    metric, op, rhs = m["metric"], m["op"], m["rhs"]
    if metric not in KNOWN_METRICS:
        raise ValueError(f"unknown metric '{metric}'; known metrics: {_known()}")
    if re.fullmatch(_NUM, rhs):
        return Gate(text, metric, op, None, 1.0, float(rhs))
    r = _RHS.match(rhs)
    if not r or r["ref"] not in REFERENCES or (r["scale"] and r["scale2"]):
        raise ValueError(f"threshold '{rhs}' must be a number or `[K *] base|production [+|- C]` (e.g. `0.9 * base`)")
    scale = float(r["scale"] or r["scale2"] or 1.0)
    offset = float(r["offset"] or 0.0) * (-1.0 if r["sign"] == "-" else 1.0)
    return Gate(text, metric, op, r["ref"], scale, offset)


def parse_gates(cfg: EvaluationConfig) -> list[Gate]:
    """All gates of a config, or one ConfigError listing every bad one; runs before any model loads."""
    gates, problems = [], []
    for i, text in enumerate(cfg.gates):
        try:
            gate = parse_gate(text)
        except ValueError as exc:
            problems.append(f"evaluation.gates[{i}] `{text}`: {exc}")
            continue
        if gate.suite not in cfg.suites:
            problems.append(
                f"evaluation.gates[{i}] `{text}`: metric '{gate.metric}' comes from the "
                f"'{gate.suite}' suite, which evaluation.suites does not run "
                f"({', '.join(cfg.suites) or 'none'})"
            )
        elif gate.ref == "base" and not cfg.compare_base:
            problems.append(f"evaluation.gates[{i}] `{text}`: compares with base but compare_base is false")
        elif gate.ref == "production" and not cfg.compare_production:
            problems.append(f"evaluation.gates[{i}] `{text}`: compares with production but compare_production is false")
        gates.append(gate)
    if problems:
        raise ConfigError(problems)
    return gates


def judge(
    gates: list[Gate],
    metrics: dict[str, dict[str, Metric]],
    samples: int,
    confidence: float,
    seed: int,
    gate_on_ci: bool = False,
) -> list[GateResult]:
    """Judge every gate on the `model` subject's metrics; relative gates resample both subjects paired."""
    rng = np.random.default_rng(seed)
    model = metrics.get("model", {})
    results = []
    for gate in gates:
        mine = model.get(gate.metric)
        if mine is None or not np.isfinite(mine.value):
            results.append(GateResult(gate.text, gate.metric, None, None, None, None, False, "not measured"))
            continue
        other = metrics.get(gate.ref, {}).get(gate.metric) if gate.ref else None
        if gate.ref and other is None:
            if gate.ref == "production":
                results.append(
                    GateResult(gate.text, gate.metric, mine.value, None, None, None, True, "n/a: no production")
                )
            else:
                results.append(
                    GateResult(gate.text, gate.metric, mine.value, None, None, None, False, "base not measured")
                )
            continue
        threshold = gate.threshold(other.value if other else None)
        passed = _OPS[gate.op](mine.value, threshold)
        idx = draws(mine.n, samples, rng) if mine.n else np.empty((0, 0), dtype=int)
        values = mine.resample(idx) if mine.n else np.array([])
        ci = interval(values, confidence) if values.size else None
        margin_ci = None
        if values.size:
            paired = other is not None and other.n == mine.n
            ref_values = other.resample(idx) if (other is not None and paired) else None
            thresholds = (
                gate.scale * ref_values + gate.offset if ref_values is not None else np.full(len(values), threshold)
            )
            margin_ci = interval(values - thresholds, confidence)
        note = ""
        if gate_on_ci and margin_ci is not None:
            lo, hi = margin_ci
            passed = lo >= 0 if gate.op.startswith(">") else hi <= 0
            note = "decided on the whole confidence interval"
        results.append(GateResult(gate.text, gate.metric, mine.value, threshold, ci, margin_ci, bool(passed), note))
    return results
