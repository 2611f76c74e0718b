"""Monitoring checks: thresholds from the job's `monitoring` section, parsed before anything is read.

A check reads like an evaluation gate, `METRIC OP THRESHOLD`: METRIC may end in `.lower` or `.upper` to judge
a bound of its confidence interval instead of the point value (`bad_feedback_share.upper <= 0.5` fails only
when even the optimistic end is bad); THRESHOLD is a number or, for live-bias metrics, `[K *] base [+|- C]`,
the same probes answered by the base model. A check whose metric could not be measured is neither passed nor
failed: it is reported with the reason (too little traffic, content not captured, no training data logged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import ConfigError
from evaluate.gates import _NUM, _OPS  # one comparison grammar for gates and checks

PASS, FAIL, NO_DATA = "PASS", "FAIL", "NO DATA"

KNOWN_METRICS: dict[str, tuple[str, str]] = {
    "drift_domain_auc": ("drift", "ROC AUC of a classifier telling window prompts from training prompts (0.5: alike)"),
    "drift_domain_pvalue": ("drift", "permutation p-value of that classifier's AUC"),
    "drift_length_ks": ("drift", "Kolmogorov-Smirnov statistic of prompt lengths in words"),
    "drift_length_pvalue": ("drift", "p-value of the two-sample Kolmogorov-Smirnov test of prompt lengths"),
    "drift_language_share": ("drift", "share of window prompts in the training prompts' main language"),
    "drift_oov_share": ("drift", "share of window prompt words never seen in the training prompts"),
    "bias_sentiment_gap": ("bias", "mean max - min VADER sentiment across demographic swaps of real prompts"),
    "bias_refusal_gap": ("bias", "mean max - min refusal across demographic swaps of real prompts"),
    "error_rate": ("service", "share of requests that ended in an error"),
    "latency_p99_s": ("service", "99th percentile of request latency, seconds"),
    "truncated_share": ("service", "share of answers cut at max_tokens (finish reason `length`)"),
    "empty_share": ("service", "share of successful answers with no text"),
    "bad_feedback_share": ("feedback", "share of ratings that are bad (normalised rating below 0.5)"),
}
BOUNDS = ("lower", "upper")
_CHECK = re.compile(r"^\s*(?P<metric>[A-Za-z_]\w*)(?:\.(?P<bound>[a-z]+))?\s*(?P<op>>=|<=|>|<)\s*(?P<rhs>.+?)\s*$")
_RHS = re.compile(rf"^(?:(?P<scale>{_NUM})\s*\*\s*)?(?P<ref>[A-Za-z_]\w*)(?:\s*(?P<sign>[-+])\s*(?P<offset>{_NUM}))?$")


@dataclass(frozen=True)
class Check:
    """`metric[.bound] op scale * ref + offset`; ref None means an absolute threshold (the offset)."""

    text: str
    metric: str
    bound: str | None
    op: str
    ref: str | None
    scale: float = 1.0
    offset: float = 0.0

    @property
    def group(self) -> str:
        return KNOWN_METRICS[self.metric][0]

    def threshold(self, ref_value: float | None) -> float:
        return self.offset if self.ref is None else self.scale * float(ref_value or 0.0) + self.offset


@dataclass(frozen=True)
class Measure:
    """One measured value with its interval (when it has one) and, for live bias, the base model's value."""

    value: float
    ci: tuple[float, float] | None = None
    base: float | None = None
    n: int = 0


@dataclass
class CheckResult:
    check: str
    group: str
    metric: str
    verdict: str  # PASS, FAIL or NO DATA
    value: float | None = None
    ci: tuple[float, float] | None = None
    threshold: float | None = None
    note: str = ""

    def describe(self) -> str:
        if self.verdict == NO_DATA:
            return f"{self.verdict:7}  {self.check}: {self.note}"
        ci = f" [{self.ci[0]:.4g}, {self.ci[1]:.4g}]" if self.ci else ""
        thr = "" if self.threshold is None else f", threshold {self.threshold:.4g}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.verdict:7}  {self.check}: value {self.value:.4g}{ci}{thr}{note}"


def parse_check(text: str) -> Check:
    """One check, or ValueError with the reason (collected into one ConfigError by parse_checks)."""
    m = _CHECK.match(text)
    if not m:
        raise ValueError("expected `METRIC OP THRESHOLD` with OP one of >=, <=, >, <")
    metric, bound, op, rhs = m["metric"], m["bound"], m["op"], m["rhs"]
    if metric not in KNOWN_METRICS:
        raise ValueError(f"unknown metric '{metric}'; known metrics: {', '.join(KNOWN_METRICS)}")
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"'{metric}.{bound}': a metric may end in .lower or .upper only")
    if re.fullmatch(_NUM, rhs):
        return Check(text, metric, bound, op, None, 1.0, float(rhs))
    r = _RHS.match(rhs)
    if not r or r["ref"] != "base":
        raise ValueError(f"threshold '{rhs}' must be a number or `[K *] base [+|- C]` (e.g. `base + 0.3`)")
    if KNOWN_METRICS[metric][0] != "bias":
        raise ValueError(f"'{metric}' has no base-model value: only live-bias metrics compare with base")
    offset = float(r["offset"] or 0.0) * (-1.0 if r["sign"] == "-" else 1.0)
    return Check(text, metric, bound, op, "base", float(r["scale"] or 1.0), offset)


def parse_checks(checks: list[str]) -> list[Check]:
    """Every check, or one ConfigError naming each bad one by its place in `monitoring.checks`."""
    parsed, problems = [], []
    for i, text in enumerate(checks):
        try:
            parsed.append(parse_check(text))
        except ValueError as exc:
            problems.append(f"monitoring.checks[{i}] `{text}`: {exc}")
    if problems:
        raise ConfigError(problems)
    return parsed


def judge(checks: list[Check], measures: dict[str, Measure], missing: dict[str, str]) -> list[CheckResult]:
    """Judge each check; a metric not measured becomes NO DATA with the reason `missing` gives for its group."""
    results = []
    for check in checks:
        measure = measures.get(check.metric)
        if measure is None:
            why = missing.get(check.metric) or missing.get(check.group) or "not measured"
            results.append(CheckResult(check.text, check.group, check.metric, NO_DATA, note=why))
            continue
        value = measure.value
        if check.bound is not None:
            if measure.ci is None:
                results.append(
                    CheckResult(check.text, check.group, check.metric, NO_DATA, note="no confidence interval")
                )
                continue
            value = measure.ci[0] if check.bound == "lower" else measure.ci[1]
        if check.ref == "base" and measure.base is None:
            results.append(
                CheckResult(check.text, check.group, check.metric, NO_DATA, note="the base model was not measured")
            )
            continue
        threshold = check.threshold(measure.base)
        passed = _OPS[check.op](value, threshold)
        notes = [f"judged on its {check.bound} bound"] if check.bound else []
        notes += [f"base {measure.base:.4g}"] if measure.base is not None else []
        notes += [f"n={measure.n}"] if measure.n else []
        results.append(
            CheckResult(
                check.text,
                check.group,
                check.metric,
                PASS if passed else FAIL,
                value=measure.value,
                ci=measure.ci,
                threshold=threshold,
                note=", ".join(notes),
            )
        )
    return results
