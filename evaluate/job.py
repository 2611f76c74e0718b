"""Evaluate one registered version: quality and bias beside base and production, gates, verdict, MLflow.

Order matters for the user: everything that can be wrong with the input (gates, the model reference,
suite files) is checked before any model loads, and nothing moves an alias here.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.device import DevicePref, DtypePref
from core.errors import DataError
from core.registry import PRODUCTION, VersionRef, connect, current_alias, resolve_version
from core.schema.data import ColumnMap
from core.schema.evaluation import EvaluationConfig
from core.version import OpenedVersion, open_version
from evaluate import judge as llm_judge
from evaluate import model_card, readers, tracking, verdict
from evaluate.bbq import run_bbq
from evaluate.bootstrap import Metric
from evaluate.counterfactual import run_counterfactual
from evaluate.crows import run_crows
from evaluate.gates import Gate, judge, parse_gates, skipped_result
from evaluate.quality import run_quality
from evaluate.results import SuiteResult
from evaluate.sampling import stratified_sample
from evaluate.scoring import Subject
from evaluate.subjects import BASE, MODEL, PROD, load_subjects
from evaluate.verdict import Verdict

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

VALIDATION_ARTIFACT = "data/validation.jsonl"
CONFIG_ARTIFACT = "config/resolved.yaml"


@dataclass
class Inputs:
    """Every item to evaluate, read and validated up front; `sources` says where each suite came from."""

    quality: list[readers.QualityItem]
    crows: list[readers.CrowsPair]
    bbq: list[readers.BbqItem]
    counterfactual: list[readers.CounterfactualTemplate]
    sources: dict[str, str]


def _validation_split(ref: VersionRef, dest: Path) -> Path | None:
    """The training run's held-out split, or None when the run logged none (or an empty one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not ref.run_id:
        return None
    try:
        path = Path(
            mlflow.artifacts.download_artifacts(
                run_id=ref.run_id, artifact_path=VALIDATION_ARTIFACT, dst_path=str(dest)
            )
        )
    except (MlflowException, OSError):
        return None
    return path if path.read_text(encoding="utf-8").strip() else None  # the job had no validation split


def _training_columns(ref: VersionRef, dest: Path) -> ColumnMap | None:
    """The training job's `data.columns`, so extra files may name their columns the way its data did."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    if not ref.run_id:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=CONFIG_ARTIFACT, dst_path=str(dest))
        resolved = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (MlflowException, OSError, yaml.YAMLError):
        return None
    data = resolved.get("data") if isinstance(resolved, dict) else None
    try:
        return ColumnMap.model_validate(data["columns"]) if isinstance(data, dict) and data.get("columns") else None
    except ValidationError:
        return None


def sample_size(cfg: EvaluationConfig, configured: int | None) -> int | None:
    """Items to draw from a bias suite: the configured sample (every item with `full`), capped by max_bias_items."""
    size = None if cfg.full else configured
    if cfg.max_bias_items is not None:
        size = cfg.max_bias_items if size is None else min(size, cfg.max_bias_items)
    return size


def _sampled(n: int, total: int, what: str, strata: str, cfg: EvaluationConfig) -> str:
    if n >= total:
        return f"all {total} {what}"
    return f"{n} of {total} {what}, stratified by {strata}, seed {cfg.sample.seed}"


def read_inputs(cfg: EvaluationConfig, ref: VersionRef, workdir: Path) -> Inputs:
    """Read every suite the config asks for; malformed or empty files fail here, naming file and line."""
    quality: list[readers.QualityItem] = []
    sources: dict[str, str] = {}
    if "quality" in cfg.suites:
        split = _validation_split(ref, workdir / "validation")
        files = ([split] if split else []) + [Path(p) for p in cfg.extra_files]
        if not files:
            raise DataError(
                f"{ref.label}: its training run logged no (or an empty) {VALIDATION_ARTIFACT} and "
                "evaluation.extra_files is empty, so there is nothing to measure quality on (name a file, or drop "
                "'quality' from suites)"
            )
        columns = _training_columns(ref, workdir / "config") if cfg.extra_files else None
        for path in files:
            items = readers.read_quality(path, cfg.max_examples, columns=None if path == split else columns)
            quality += items
            label = f"training run {ref.run_id} {VALIDATION_ARTIFACT}" if path == split else str(path)
            sources[f"quality: {path.name}"] = f"{label} ({len(items)} items)"
    crows: list[readers.CrowsPair] = []
    bbq: list[readers.BbqItem] = []
    counterfactual: list[readers.CounterfactualTemplate] = []
    if "crows" in cfg.suites:
        path = cfg.crows_path or readers.DEFAULT_CROWS
        every = readers.read_crows(path)
        crows = stratified_sample(every, lambda p: p.bias_type, sample_size(cfg, cfg.sample.crows), cfg.sample.seed)
        sources["crows"] = f"{path} ({_sampled(len(crows), len(every), 'pairs', 'bias type', cfg)})"
    if "bbq" in cfg.suites:
        path = cfg.bbq_path or readers.DEFAULT_BBQ
        everything = readers.read_bbq(path)
        bbq = stratified_sample(
            everything,
            lambda it: (it.category, it.condition, it.polarity),
            sample_size(cfg, cfg.sample.bbq),
            cfg.sample.seed,
        )
        sources["bbq"] = (
            f"{path} ({_sampled(len(bbq), len(everything), 'items', 'category, context and polarity', cfg)})"
        )
    if "counterfactual" in cfg.suites:
        path = cfg.counterfactual_path or readers.DEFAULT_COUNTERFACTUAL
        counterfactual = readers.read_counterfactual(path, cfg.max_bias_items)
        sources["counterfactual"] = f"{path} ({len(counterfactual)} templates)"
    return Inputs(quality, crows, bbq, counterfactual, sources)


def _production(client: MlflowClient, ref: VersionRef, cfg: EvaluationConfig) -> str | None:
    """The production version to compare with, if any (may be the version under test itself)."""
    if not cfg.compare_production:
        return None
    return current_alias(client, ref.name, PRODUCTION)


def _for_suite(subjects: dict[str, Subject], suite: str, gates: list[Gate]) -> dict[str, Subject]:
    """Quality runs on every subject; bias suites on production only when a gate compares with it."""
    if suite == "quality" or any(g.suite == suite and g.ref == PROD for g in gates):
        return subjects
    return {k: v for k, v in subjects.items() if k != PROD}


def _quality(cfg: EvaluationConfig, inputs: Inputs, subjects: dict[str, Subject]) -> SuiteResult:
    """The quality suite, its answers graded by the LLM judge when `evaluation.judge` names one."""
    result = run_quality(subjects, inputs.quality, cfg.max_new_tokens, cfg.batch_size, cfg.exact_match_max_words)
    if cfg.judge is not None:
        log.info("quality: the judge %s at %s grades %d answers", cfg.judge.model, cfg.judge.base_url, len(result.rows))
        llm_judge.add_judge(result, cfg.judge)
    return result


def _measure(
    cfg: EvaluationConfig, inputs: Inputs, subjects: dict[str, Subject], gates: list[Gate]
) -> tuple[dict[str, SuiteResult], dict[str, float]]:
    """Run every suite that has items; returns the results and the seconds each suite took."""
    results: dict[str, SuiteResult] = {}
    seconds: dict[str, float] = {}
    plan = [
        (
            "quality",
            bool(inputs.quality),
            lambda s: _quality(cfg, inputs, s),
        ),
        ("crows", bool(inputs.crows), lambda s: run_crows(s, inputs.crows, cfg.batch_size)),
        ("bbq", bool(inputs.bbq), lambda s: run_bbq(s, inputs.bbq, cfg.batch_size)),
        (
            "counterfactual",
            bool(inputs.counterfactual),
            lambda s: run_counterfactual(s, inputs.counterfactual, cfg.counterfactual_max_new_tokens, cfg.batch_size),
        ),
    ]
    for suite, has_items, run in plan:
        if not has_items:
            continue
        t0 = time.perf_counter()
        log.info("evaluating %s", suite)
        results[suite] = run(_for_suite(subjects, suite, gates))
        seconds[suite] = time.perf_counter() - t0
        log.info("%s done in %.1f s", suite, seconds[suite])
    return results, seconds


def _mirror_production(results: dict[str, SuiteResult]) -> None:
    """When the version under test is production, production's numbers are its own."""
    for result in results.values():
        if MODEL in result.metrics:
            result.metrics[PROD] = dict(result.metrics[MODEL])


def run_evaluation(
    ref: str,
    cfg: EvaluationConfig | None = None,
    *,
    tracking_uri: str | None = None,
    device: DevicePref = "auto",
    dtype: DtypePref = "auto",
    skipped_gates: Sequence[str] = (),
) -> Verdict:
    """Evaluate a registered version and record the verdict; never moves an alias.

    ref: `NAME` (its production alias), `NAME@ALIAS`, `NAME/VERSION` or the training run id.
    cfg: suites, sizes and gates; default `EvaluationConfig()` (every suite, no gates).
    tracking_uri: MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
    device, dtype: as core.device chooses them (`auto`: CUDA if present, bf16 where the CPU runs it fast).
    skipped_gates: gates of suites this evaluation does not run; listed in the verdict, which is then at best
    "partial" (see evaluate.verdict).

    Writes a child run of the version's training run (metrics, tables, charts, model card), tags the
    version with `tuneops.verdict`, `tuneops.evaluation_run` and `tuneops.gates_failed`, and makes the card's
    summary (verdict, gates with intervals, headline metrics) the version's description in the registry.
    Raises a TuneopsError (exit status 2) for a bad reference, gate, or suite file, before loading a model.
    """
    cfg = cfg or EvaluationConfig()
    gates = parse_gates(cfg)
    skipped = [skipped_result(text) for text in skipped_gates]
    client = connect(tracking_uri)
    version = resolve_version(client, ref)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneops-eval-") as tmp:
        workdir = Path(tmp)
        inputs = read_inputs(cfg, version, workdir)
        if cfg.judge is not None and inputs.quality:
            llm_judge.check_endpoint(cfg.judge)
        bundle = open_version(client, version, workdir / "model")
        prod_version = _production(client, version, cfg)
        production: OpenedVersion | None = None
        if prod_version is not None and prod_version != version.version:
            prod_ref = resolve_version(client, f"{version.name}/{prod_version}")
            production = open_version(client, prod_ref, workdir / "production")
        run_id = tracking.start_run(client, version)
        try:
            subjects = load_subjects(bundle, production, cfg.compare_base, device, dtype)
            results, seconds = _measure(cfg, inputs, subjects, gates)
            if prod_version == version.version:
                _mirror_production(results)
            merged: dict[str, dict[str, Metric]] = {}
            for result in results.values():
                for subject, metrics in result.metrics.items():
                    merged.setdefault(subject, {}).update(metrics)
            gate_results = judge(gates, merged, cfg.bootstrap_samples, cfg.confidence, cfg.seed, cfg.gate_on_ci)
            outcome = Verdict(
                version.name,
                version.version,
                all(g.passed for g in gate_results),
                gate_results,
                run_id,
                skipped=skipped,
            )
            _log(client, run_id, version, bundle, cfg, inputs, results, outcome, prod_version)
            for suite, took in seconds.items():
                client.log_metric(run_id, f"eval.seconds.{suite}", took)
            client.log_metric(run_id, "eval.seconds", time.perf_counter() - started)
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
    verdict.record(client, outcome)
    client.update_model_version(version.name, version.version, description=outcome.description)
    if version.run_id:
        client.set_tag(version.run_id, verdict.EVALUATION_RUN_TAG, run_id)
    log.debug("%s", outcome.summary())  # callers present the verdict; logging it too printed it twice
    return outcome


def _log(
    client: MlflowClient,
    run_id: str,
    version: VersionRef,
    bundle: OpenedVersion,
    cfg: EvaluationConfig,
    inputs: Inputs,
    results: dict[str, SuiteResult],
    outcome: Verdict,
    prod_version: str | None,
) -> None:
    """Numbers, tables, charts, config, verdict and model card into the evaluation run."""
    import yaml

    outcome.metrics, charts = tracking.log_results(client, run_id, results)
    client.log_metric(run_id, "verdict.passed", float(outcome.passed))
    client.log_metric(run_id, "verdict.gates_failed", float(len(outcome.failed)))
    client.log_param(run_id, "evaluated_version", version.label)
    client.log_param(run_id, "production_version", prod_version or "none")
    client.log_param(run_id, "full", str(cfg.full))
    client.log_param(run_id, "sample.seed", str(cfg.sample.seed))
    if cfg.judge is not None:
        client.log_param(run_id, "judge", f"{cfg.judge.model} at {cfg.judge.base_url}")
    for suite in ("crows", "bbq"):
        if suite in inputs.sources:
            client.log_param(run_id, f"sample.{suite}", str(len(getattr(inputs, suite))))
    client.log_param(
        run_id,
        "compared_with",
        ",".join(s for s in (BASE, PROD) if any(s in r.metrics for r in results.values())) or "none",
    )
    client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/evaluation.yaml")
    client.log_dict(
        run_id,
        {
            "passed": outcome.passed,
            "outcome": outcome.outcome,
            "gates": [g.__dict__ for g in outcome.gates],
            "skipped": [g.__dict__ for g in outcome.skipped],
            "sources": inputs.sources,
        },
        "verdict.json",
    )
    card = model_card.CardInputs(
        label=version.label,
        manifest=bundle.manifest,
        training=tracking.training_summary(client, version),
        results=results,
        sources=inputs.sources,
        verdict=outcome,
        production_label=f"{version.name}/{prod_version}" if prod_version else None,
        charts=charts,
        confidence=cfg.confidence,
    )
    blocks = model_card.build(card)
    markdown = model_card.to_markdown(blocks)
    client.log_text(run_id, markdown, "model_card.md")
    client.log_text(run_id, model_card.to_html(blocks), "model_card.html")
    outcome.model_card = markdown
    outcome.description = model_card.registry_description(card)
