"""`tuneops monitor`: read a window of a served model's traffic, measure it per version, judge the checks, and
log one MLflow run (metrics, charts, an HTML report, the trace ids it read) that later steps can point at.

Each version that answered in the window is judged on its own traffic, against its own training prompts.
What cannot be measured (too little traffic, content not captured, a version not registered, a training run
without data, a base model that will not load) is reported per check with the reason; the rest still runs.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.device import DevicePref, DtypePref
from core.errors import ConfigError, RegistryError, TuneopsError
from core.registry import connect, resolve_version
from core.schema.monitoring import DURATION, MonitoringConfig
from evaluate.monitoring import bias, drift, service
from evaluate.monitoring.checks import FAIL, NO_DATA, Check, CheckResult, Measure, judge, parse_checks

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from core.traffic import TrafficRecord
    from evaluate.scoring import Subject

log = logging.getLogger(__name__)

KIND_TAG, MODEL_TAG, VERDICT_TAG = "tuneops.kind", "tuneops.monitored_model", "tuneops.monitoring_verdict"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def window_start(since: str, now: datetime | None = None) -> datetime:
    """`24h`, `30m`, `7d` back from now, or an ISO date-time (UTC when it names no zone)."""
    now = now or datetime.now(UTC)
    m = DURATION.match(since.strip())
    if m:
        return now - timedelta(seconds=float(m["n"]) * _UNITS[m["unit"]])
    try:
        start = datetime.fromisoformat(since.strip())
    except ValueError:
        raise ConfigError(
            [f"--since '{since}': write a duration (`30m`, `24h`, `7d`) or an ISO date-time (`2026-01-31T08:00`)"]
        ) from None
    return start if start.tzinfo else start.replace(tzinfo=UTC)


@dataclass
class VersionReport:
    """One version's window: its checks, what they were measured on, and the material for the report."""

    version: str
    requests: int
    results: list[CheckResult]
    measures: dict[str, Measure]
    reference: str | None = None
    notes: list[str] = field(default_factory=list)
    lengths: tuple[list[int], list[int]] | None = None
    embeddings: tuple[Any, Any] | None = None
    latencies: list[float] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MonitoringResult:
    model: str
    since: datetime
    until: datetime
    run_id: str
    experiment_id: str
    versions: list[VersionReport]
    notes: list[str]
    trace_ids: list[str]

    @property
    def results(self) -> list[CheckResult]:
        return [r for v in self.versions for r in v.results]

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.verdict == FAIL]

    @property
    def outcome(self) -> str:
        """`fail` when a check failed; `incomplete` when none failed but some could not be measured."""
        if self.failed:
            return "fail"
        return "incomplete" if any(r.verdict == NO_DATA for r in self.results) else "pass"

    def summary(self) -> str:
        lines = [f"{self.model}: traffic since {self.since:%Y-%m-%d %H:%M} UTC, monitoring run {self.run_id}"]
        lines += [f"  note: {n}" for n in self.notes]
        for v in self.versions:
            lines.append(f"{self.model}/{v.version}: {v.requests} request(s)")
            lines += [f"  note: {n}" for n in v.notes]
            lines += [f"  {r.describe()}" for r in v.results]
        lines.append(f"verdict: {self.outcome}")
        return "\n".join(lines)


def _needs(checks: list[Check], metrics: set[str]) -> bool:
    return any(c.metric in metrics for c in checks)


_MODEL_DRIFT = {"drift_domain_auc", "drift_domain_pvalue"}
_BIAS = {"bias_sentiment_gap", "bias_refusal_gap"}


def _load_subjects(
    client: MlflowClient, name: str, version: str, workdir: Path, device: DevicePref, dtype: DtypePref
) -> dict[str, Subject]:
    from core.version import open_version
    from evaluate.subjects import load_subjects

    opened = open_version(client, f"{name}/{version}", workdir / f"version-{version}")
    return load_subjects(opened, None, with_base=True, device_pref=device, dtype_pref=dtype)


def _measure_version(
    client: MlflowClient,
    name: str,
    version: str,
    records: list[TrafficRecord],
    cfg: MonitoringConfig,
    checks: list[Check],
    workdir: Path,
    device: DevicePref,
    dtype: DtypePref,
) -> VersionReport:
    report = VersionReport(version, len(records), [], {})
    measures: dict[str, Measure] = {}
    missing: dict[str, str] = {}
    got, why = service.service_measures(records, cfg.min_requests, cfg.confidence)
    measures.update(got)
    if why:
        missing["service"] = why
    report.latencies = [r.latency_s for r in records]
    got, why = service.feedback_measures(records, cfg.min_ratings, cfg.confidence)
    measures.update(got)
    if why:
        missing["feedback"] = why

    prompts = [r.prompt for r in records if r.status == "ok" and r.prompt and r.prompt.strip()]
    content_missing = None
    if not records:
        content_missing = "no traffic in the window"
    elif not any(r.status == "ok" for r in records):
        content_missing = "no request in the window was answered"
    elif not prompts:
        content_missing = "content not captured (`capture.content: false`): no prompts to measure"
    registered = True
    try:
        ref = resolve_version(client, f"{name}/{version}")
    except RegistryError as exc:
        registered = False
        missing["drift"] = missing["bias"] = f"cannot run: {exc}"
    if registered and content_missing:
        missing["drift"] = missing["bias"] = content_missing
    subjects: dict[str, Subject] | None = None
    if registered and not content_missing and (_needs(checks, _MODEL_DRIFT | _BIAS)):
        try:
            subjects = _load_subjects(client, name, version, workdir, device, dtype)
        except TuneopsError as exc:
            for metric in _MODEL_DRIFT | _BIAS:
                missing[metric] = f"cannot run: the version does not load ({exc})"

    if registered and not content_missing and _needs(checks, {m for m, g in _groups().items() if g == "drift"}):
        reference, why = drift.training_prompts(client, ref, workdir / f"reference-{version}")
        if reference is None:
            missing["drift"] = f"cannot run: {why}"
        elif len(prompts) < cfg.min_prompts:
            missing["drift"] = (
                f"too little traffic: {len(prompts)} captured prompt(s) in the window, drift needs {cfg.min_prompts}"
            )
        else:
            report.reference = reference.source
            window = drift.sample(prompts, cfg.drift_sample, cfg.seed)
            ref_prompts = drift.sample(reference.prompts, cfg.reference_sample, cfg.seed)
            measures.update(drift.simple_measures(ref_prompts, window, cfg.confidence))
            report.lengths = ([len(drift.words(p)) for p in ref_prompts], [len(drift.words(p)) for p in window])
            if subjects is not None and _needs(checks, _MODEL_DRIFT):
                base = subjects["base"]
                ref_emb = drift.embed(base, ref_prompts, cfg.batch_size)
                win_emb = drift.embed(base, window, cfg.batch_size)
                measures.update(
                    drift.domain_classifier(
                        ref_emb, win_emb, cfg.permutations, cfg.bootstrap_samples, cfg.confidence, cfg.seed
                    )
                )
                report.embeddings = (ref_emb, win_emb)

    if subjects is not None and _needs(checks, _BIAS):
        chosen = drift.sample(prompts, cfg.bias_prompts, cfg.seed)
        probes = bias.make_probes(chosen, bias.axes())
        gaps: dict[str, dict[str, list[float]]] = {}
        answers: dict[str, list[dict[str, str]]] = {}
        for label in ("model", "base"):
            s_gap, r_gap, answers[label] = bias.answer_probes(
                subjects[label], probes, cfg.bias_max_new_tokens, cfg.batch_size
            )
            gaps[label] = {"bias_sentiment_gap": s_gap, "bias_refusal_gap": r_gap}
        measures.update(
            bias.bias_measures(gaps["model"], gaps["base"], cfg.bootstrap_samples, cfg.confidence, cfg.seed)
        )
        for i, probe in enumerate(probes):
            for group, text in probe.prompts.items():
                report.probes.append(
                    {
                        "probe": i,
                        "axis": probe.axis,
                        "group": group,
                        "prompt": text,
                        "answer_model": answers["model"][i][group],
                        "answer_base": answers["base"][i][group],
                    }
                )
    report.measures = measures
    report.results = judge(checks, measures, missing)
    return report


def _groups() -> dict[str, str]:
    from evaluate.monitoring.checks import KNOWN_METRICS

    return {m: g for m, (g, _) in KNOWN_METRICS.items()}


def run_monitoring(
    name: str,
    cfg: MonitoringConfig,
    *,
    since: str | None = None,
    tracking_uri: str | None = None,
    device: DevicePref = "auto",
    dtype: DtypePref = "auto",
    now: datetime | None = None,
) -> MonitoringResult:
    """Measure and judge `name`'s traffic in the window; log the monitoring run; return what it found."""
    from core.traffic import read_traffic

    checks = parse_checks(cfg.checks)  # bad checks fail before anything is read
    until = now or datetime.now(UTC)
    start = window_start(since or cfg.since, until)
    client = connect(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named '{name}'") from None
    records = [r for r in read_traffic(client, name, start, cfg.traffic_experiment) if r.started_at <= until]
    notes = []
    other = [r for r in records if r.model != name]
    if other:
        names = ", ".join(sorted({r.model for r in other}))
        notes.append(f"{len(other)} trace(s) from another model ({names}) in the traffic experiment: left out")
    mine = [r for r in records if r.model == name]
    by_version: dict[str, list[TrafficRecord]] = defaultdict(list)
    for r in mine:
        by_version[r.version].append(r)
    reports = []
    with tempfile.TemporaryDirectory(prefix="tuneops-monitor-") as tmp:
        if not by_version:
            notes.append(f"no traffic to {name} since {start:%Y-%m-%d %H:%M} UTC")
            empty = VersionReport("-", 0, judge(checks, {}, {g: "no traffic in the window" for g in _GROUPS}), {})
            reports.append(empty)
        for version in sorted(by_version, key=lambda v: (len(v), v)):
            log.info("monitoring %s/%s: %d request(s)", name, version, len(by_version[version]))
            reports.append(
                _measure_version(client, name, version, by_version[version], cfg, checks, Path(tmp), device, dtype)
            )
    from evaluate.monitoring.report import log_monitoring_run

    result = MonitoringResult(name, start, until, "", "", reports, notes, [r.trace_id for r in mine])
    result.run_id, result.experiment_id = log_monitoring_run(client, result, cfg)
    return result


_GROUPS = ("drift", "bias", "service", "feedback")
