"""Gates: thresholds from the job config, parsed before any model loads, judged with bootstrap intervals.

A gate reads `LEFT OP THRESHOLD` with OP one of >=, <=, >, <. LEFT is

- `METRIC`: the version's value (e.g. `rougeL >= base`);
- `METRIC.lower` / `METRIC.upper`: a bound of the version's bootstrap interval (`rougeL.lower >= base`,
  `crows_pct_stereotype.upper <= base + 5`), so a noisy measurement cannot pass by luck;
- `(METRIC - base)` or `(METRIC - production)`, optionally with `.lower` / `.upper`: the paired difference
  from the other model on the same items, resampled item by item (`(crows_pct_stereotype - base).upper <= 5`),
  far tighter than either model's own interval because item difficulty cancels.

THRESHOLD is a number or, for the first two forms, a reference to the same metric on another model, optionally
scaled and offset: `0.9 * base`, `base + 2`, `production - 0.05`, `1.1 * production + 1` (its point value).
A lower bound is compared with `>=` / `>` only and an upper bound with `<=` / `<`: the other way round a
noisier measurement would pass more easily. A gate relative to production passes (marked n/a) while no
production version exists: a first version has no champion to beat.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
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
    "judge_correct": ("quality", "share of answers the LLM judge (evaluation.judge) graded correct"),
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
_GATE = re.compile(r"^\s*(?P<left>.+?)\s*(?P<op>>=|<=|>|<)\s*(?P<rhs>.+?)\s*$")
_LEFT = re.compile(
    r"^(?:(?P<metric>[A-Za-z_]\w*)|\(\s*(?P<dmetric>[A-Za-z_]\w*)\s*-\s*(?P<dref>[A-Za-z_]\w*)\s*\))"
    r"(?:\.(?P<bound>[A-Za-z_]\w*))?$"
)
_RHS = re.compile(
    rf"^(?:(?P<scale>{_NUM})\s*\*\s*)?(?P<ref>[A-Za-z_]\w*)(?:\s*\*\s*(?P<scale2>{_NUM}))?"
    rf"(?:\s*(?P<sign>[-+])\s*(?P<offset>{_NUM}))?$"
)
BOUNDS = ("lower", "upper")


@dataclass(frozen=True)
class Gate:
    """`LEFT op scale * ref + offset`; ref None means an absolute threshold (the offset).

    bound: which end of the interval is compared ("lower", "upper"), None for the point value.
    paired: the model whose value is subtracted item by item (`(METRIC - paired)`), None for the metric alone.
    """

    text: str
    metric: str
    op: str
    ref: str | None
    scale: float = 1.0
    offset: float = 0.0
    bound: str | None = None
    paired: str | None = None

    @property
    def suite(self) -> str:
        return KNOWN_METRICS[self.metric][0]

    @property
    def compares_with(self) -> str | None:
        """The other model this gate needs measured (base or production), if any."""
        return self.paired or self.ref

    def threshold(self, ref_value: float | None) -> float:
        return self.offset if self.ref is None else self.scale * float(ref_value or 0.0) + self.offset


@dataclass
class GateResult:
    """A judged gate: `value` (the version's, or the paired difference), its interval `ci`, the number the gate
    compared (`compared`: the value or a bound of `ci`) and the `threshold`; `margin_ci` is the interval of
    value - threshold with the reference resampled on the same items."""

    gate: str
    metric: str
    value: float | None
    threshold: float | None
    ci: tuple[float, float] | None
    margin_ci: tuple[float, float] | None
    passed: bool
    note: str = ""
    decided_on: str = "value"
    compared: float | None = None
    skipped: bool = False

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        thr = "n/a" if self.threshold is None else f"{self.threshold:.4g}"
        ci = f" [{self.ci[0]:.4g}, {self.ci[1]:.4g}]" if self.ci else ""
        on = ""
        if self.decided_on != "value" and self.compared is not None:
            on = f", {self.decided_on} {self.compared:.4g}"
        note = f" ({self.note})" if self.note else ""
        status = "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")
        return f"{status}  {self.gate}: value {value}{ci}{on}, threshold {thr}{note}"


def _known() -> str:
    return ", ".join(KNOWN_METRICS)


def parse_gate(text: str) -> Gate:
    """Parse one gate; raises ValueError with a reason (collected into one ConfigError by parse_gates)."""
    m = _GATE.match(text)
    if not m:
        raise ValueError("expected `METRIC OP THRESHOLD` with OP one of >=, <=, >, <")
    left, op, rhs = m["left"], m["op"], m["rhs"]
    lm = _LEFT.match(left)
    if not lm:
        raise ValueError(
            f"left side '{left}' must be METRIC, METRIC.lower, METRIC.upper or "
            "(METRIC - base|production), optionally with .lower or .upper"
        )
    metric = lm["metric"] or lm["dmetric"]
    if metric not in KNOWN_METRICS:
        raise ValueError(f"unknown metric '{metric}'; known metrics: {_known()}")
    bound = lm["bound"]
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"unknown interval bound '.{bound}': use .lower or .upper")
    if bound == "lower" and op.startswith("<"):
        raise ValueError("a lower bound is compared with >= or >: `.lower <=` passes more easily the noisier the data")
    if bound == "upper" and op.startswith(">"):
        raise ValueError("an upper bound is compared with <= or <: `.upper >=` passes more easily the noisier the data")
    paired = lm["dref"]
    if paired is not None:
        if paired not in REFERENCES:
            raise ValueError(f"a paired difference subtracts base or production, not '{paired}'")
        if not re.fullmatch(_NUM, rhs):
            raise ValueError(f"the threshold of a paired difference is a number (e.g. `<= 5`), not '{rhs}'")
        return Gate(text, metric, op, None, 1.0, float(rhs), bound, paired)
    if re.fullmatch(_NUM, rhs):
        return Gate(text, metric, op, None, 1.0, float(rhs), bound)
    r = _RHS.match(rhs)
    if not r or r["ref"] not in REFERENCES or (r["scale"] and r["scale2"]):
        raise ValueError(f"threshold '{rhs}' must be a number or `[K *] base|production [+|- C]` (e.g. `0.9 * base`)")
    scale = float(r["scale"] or r["scale2"] or 1.0)
    offset = float(r["offset"] or 0.0) * (-1.0 if r["sign"] == "-" else 1.0)
    return Gate(text, metric, op, r["ref"], scale, offset, bound)


def gate_suite(text: str) -> str | None:
    """The suite a gate's metric comes from, None when the gate does not parse (parse_gates reports why)."""
    try:
        return parse_gate(text).suite
    except ValueError:
        return None


def split_by_suite(texts: Iterable[str], suites: Iterable[str]) -> tuple[list[str], list[str]]:
    """(gates that apply to the suites that run, gates of other suites); unparseable gates count as applying."""
    run = set(suites)
    applying: list[str] = []
    skipped: list[str] = []
    for text in texts:
        suite = gate_suite(text)
        (skipped if suite is not None and suite not in run else applying).append(text)
    return applying, skipped


def skipped_result(text: str) -> GateResult:
    """A gate that was not judged because its suite did not run."""
    gate = parse_gate(text)
    note = f"'{gate.suite}' suite not run"
    return GateResult(text, gate.metric, None, None, None, None, False, note, skipped=True)


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
        elif gate.metric == "judge_correct" and cfg.judge is None:
            problems.append(f"evaluation.gates[{i}] `{text}`: needs a judge, and evaluation.judge is not set")
        elif gate.compares_with == "base" and not cfg.compare_base:
            problems.append(f"evaluation.gates[{i}] `{text}`: compares with base but compare_base is false")
        elif gate.compares_with == "production" and not cfg.compare_production:
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
    """Judge every gate on the `model` subject's metrics; comparisons resample both models on the same items."""
    rng = np.random.default_rng(seed)
    model = metrics.get("model", {})
    return [_judge_one(gate, model, metrics, samples, confidence, rng, gate_on_ci) for gate in gates]


def _judge_one(
    gate: Gate,
    model: dict[str, Metric],
    metrics: dict[str, dict[str, Metric]],
    samples: int,
    confidence: float,
    rng: np.random.Generator,
    gate_on_ci: bool,
) -> GateResult:
    mine = model.get(gate.metric)
    if mine is None or not np.isfinite(mine.value):
        return GateResult(gate.text, gate.metric, None, None, None, None, False, "not measured")
    other_name = gate.compares_with
    other = metrics.get(other_name, {}).get(gate.metric) if other_name else None
    if other_name and (other is None or not np.isfinite(other.value)):
        if other_name == "production":
            return GateResult(gate.text, gate.metric, mine.value, None, None, None, True, "n/a: no production")
        return GateResult(gate.text, gate.metric, mine.value, None, None, None, False, "base not measured")
    idx = draws(mine.n, samples, rng) if mine.n else np.empty((0, 0), dtype=int)
    values = mine.resample(idx) if mine.n else np.array([])
    paired = other is not None and other.n == mine.n and other.n > 0 and values.size > 0
    ref_values = other.resample(idx) if (other is not None and paired) else None
    if gate.paired:
        assert other is not None
        value = mine.value - other.value
        if ref_values is None:
            note = f"no paired interval: {other_name} was not measured on the same items"
            return GateResult(gate.text, gate.metric, value, gate.offset, None, None, False, note)
        dist = values - ref_values
        threshold, thresholds = gate.offset, np.full(len(values), gate.offset)
    else:
        value, dist = mine.value, values
        threshold = gate.threshold(other.value if other else None)
        thresholds = (
            gate.scale * ref_values + gate.offset if ref_values is not None else np.full(len(values), threshold)
        )
    ci = interval(dist, confidence) if dist.size else None
    margin_ci = interval(dist - thresholds, confidence) if dist.size else None
    if gate.bound is not None:
        if ci is None:
            note = "no interval: the metric cannot be resampled"
            return GateResult(gate.text, gate.metric, value, threshold, None, None, False, note)
        compared = ci[0] if gate.bound == "lower" else ci[1]
        passed = _OPS[gate.op](compared, threshold)
        return GateResult(
            gate.text, gate.metric, value, threshold, ci, margin_ci, bool(passed), "", f"{gate.bound} bound", compared
        )
    passed = _OPS[gate.op](value, threshold)
    note = ""
    if gate_on_ci and margin_ci is not None:
        lo, hi = margin_ci
        passed = lo >= 0 if gate.op.startswith(">") else hi <= 0
        note = "decided on the whole confidence interval"
    return GateResult(gate.text, gate.metric, value, threshold, ci, margin_ci, bool(passed), note, "value", value)
