"""`tuneops retrain`: the next version, trained on the job's data plus what production taught.

The new examples are the window's answers rated good (every rating of the answer 4-5 of 5, or `good`) and the
corrected answers users sent with their feedback (a correction wins over the answer it corrects). Prompts and
answers are masked again (the gateway masked them once; masking twice changes nothing), deduplicated against
each other and against the job's own examples, and traces an earlier retrain already used are left out. With
nothing new the retrain is refused: training again on the same data would only cost time.

Lineage, each step an MLflow run that names the one before it:
monitoring run (the traces it read) <- `tuneops.trigger_run` tag of the retrain run, which logs the new training
set as an MLflow dataset input and as an MLflow GenAI evaluation dataset whose records name their source traces
<- training run (a child of the retrain run, tag `tuneops.retrain_run`) <- evaluation run <- the version (tag
`tuneops.retrain_run`). Then the pipeline's own steps: gate, `candidate`, and promotion when `promote: auto`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, DataError
from core.registry import actor, connect
from core.schema.data import ColumnMap
from core.traffic import experiment_id, mask_pii, read_traffic

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from core.schema.job import JobConfig
    from core.traffic import TrafficRecord
    from tuneops.pipeline import PipelineResult

log = logging.getLogger(__name__)

GOOD_RATING = 0.75  # normalised: `good`, 4 and 5 of 5
KIND_TAG, RETRAIN_RUN_TAG, TRIGGER_TAG = "tuneops.kind", "tuneops.retrain_run", "tuneops.trigger_run"
FROM_TAG = "tuneops.retrained_from"
TRACES_ARTIFACT = "retrain/traces.json"


@dataclass
class NewExample:
    messages: list[dict[str, str]]
    origin: str  # "rated" or "corrected"
    trace_id: str


@dataclass
class TrainingSet:
    """The job's examples and the new ones, ready to write; counts say what was kept and why not."""

    job_rows: list[list[dict[str, str]]]
    new: list[NewExample]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def trace_ids(self) -> list[str]:
        return sorted({e.trace_id for e in self.new})


def _key(messages: list[dict[str, str]]) -> str:
    """Duplicate detection ignores case and spacing, not wording."""
    return json.dumps([(m["role"], re.sub(r"\s+", " ", m["content"]).strip().lower()) for m in messages])


def _conversation(record: TrafficRecord) -> list[dict[str, str]] | None:
    """The prompt as the model saw it (chat messages or a completions prompt), masked; None when not captured."""
    if record.messages is not None:
        out = []
        for m in record.messages:
            content = m.get("content")
            if not isinstance(content, str) or m.get("role") not in ("system", "user", "assistant"):
                return None  # multi-part or tool messages: not a training example the recipe reads
            out.append({"role": str(m["role"]), "content": mask_pii(content)})
        return out if out and out[-1]["role"] == "user" else None
    if record.prompt is not None:
        return [{"role": "user", "content": mask_pii(record.prompt)}]
    return None


def new_examples(records: list[TrafficRecord], used: set[str]) -> tuple[list[NewExample], dict[str, int]]:
    """Rated-good answers and corrections from `records`, masked; traces in `used` are left out."""
    out: list[NewExample] = []
    skipped = {"already_used": 0, "not_captured": 0, "not_good": 0, "unrated": 0}  # `not_good`: or empty
    for r in records:
        if not r.feedback or r.status != "ok":
            skipped["unrated"] += 1
            continue
        if r.trace_id in used:
            skipped["already_used"] += 1
            continue
        convo = _conversation(r)
        if convo is None:
            skipped["not_captured"] += 1
            continue
        corrections = [f.correction for f in r.feedback if f.correction and f.correction.strip()]
        if corrections:
            answer, origin = corrections[-1], "corrected"
        elif r.completion and r.completion.strip() and min(f.rating for f in r.feedback) >= GOOD_RATING:
            answer, origin = r.completion, "rated"
        else:
            skipped["not_good"] += 1
            continue
        out.append(NewExample([*convo, {"role": "assistant", "content": mask_pii(answer)}], origin, r.trace_id))
    return out, skipped


def used_traces(client: MlflowClient, experiment: str, model: str) -> set[str]:
    """Trace ids earlier retrains of `model` trained on (their `retrain/traces.json`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return set()
    used: set[str] = set()
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'retrain' and tags.`{FROM_TAG}` = '{model}'"
    )
    for run in runs:
        try:
            data = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{TRACES_ARTIFACT}")
        except (MlflowException, OSError, ValueError):
            continue
        used.update(data.get("trace_ids", []))
    return used


def build_training_set(cfg: JobConfig, records: list[TrafficRecord], used: set[str]) -> TrainingSet:
    """The job's examples plus the new ones, each new one kept once and only when the job lacks it."""
    from finetune.data import read_examples

    job_rows = [ex.messages for ex in read_examples(cfg.data).examples]
    seen = {_key(m) for m in job_rows}  # type: ignore[arg-type]
    candidates, skipped = new_examples(records, used)
    kept: list[NewExample] = []
    skipped["duplicate"] = 0
    for ex in candidates:
        key = _key(ex.messages)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(ex)
    return TrainingSet(job_rows, kept, skipped)  # type: ignore[arg-type]


def _write(training: TrainingSet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for messages in training.job_rows:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        for ex in training.new:
            f.write(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n")


def _log_datasets(client: MlflowClient, run_id: str, exp: str, training: TrainingSet, path: Path, name: str) -> None:
    """The new training set as the retrain run's dataset input, and its new records as a GenAI evaluation
    dataset whose records carry their source trace (MLflow's own lineage from traces to data)."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    rows = [{"messages": json.dumps(m), "origin": "job", "trace_id": ""} for m in training.job_rows]
    rows += [{"messages": json.dumps(e.messages), "origin": e.origin, "trace_id": e.trace_id} for e in training.new]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        warnings.filterwarnings("ignore", message="Starting with pandas version 4.0", category=DeprecationWarning)
        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(path), name=name)  # type: ignore[attr-defined]
    tags = [InputTag("mlflow.data.context", "train"), InputTag("tuneops.source_traces", str(len(training.trace_ids)))]
    try:
        from mlflow.genai.datasets import create_dataset

        evaluation = create_dataset(name=name, experiment_id=exp, tags={"tuneops.retrain_run": run_id})
        evaluation.merge_records(
            [
                {
                    "inputs": {"messages": e.messages[:-1]},
                    "expectations": {"expected_response": e.messages[-1]["content"]},
                    "source": {"source_type": "TRACE", "source_data": {"trace_id": e.trace_id}},
                    "tags": {"origin": e.origin},
                }
                for e in training.new
            ]
        )
        tags.append(InputTag("tuneops.evaluation_dataset", evaluation.dataset_id))
        client.set_tag(run_id, "tuneops.evaluation_dataset", evaluation.dataset_id)
    except (MlflowException, NotImplementedError) as exc:  # a store without GenAI datasets: the input still names them
        log.warning(
            "the tracking store keeps no GenAI evaluation datasets (%s); the run's dataset input names the traces", exc
        )
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])
    client.log_dict(run_id, {"trace_ids": training.trace_ids}, TRACES_ARTIFACT)
    from evaluate.monitoring.report import link_traces

    link_traces(client, training.trace_ids, run_id)


@dataclass
class RetrainResult:
    run_id: str
    examples: int
    rated: int
    corrected: int
    pipeline: PipelineResult


def run_retrain(
    cfg: JobConfig,
    job_name: str,
    model: str,
    *,
    since: datetime | None,
    trigger_run: str | None = None,
    traffic_experiment: str | None = None,
) -> RetrainResult:
    """Build the next training set from `model`'s rated traffic and run the pipeline on it."""
    from tuneops.pipeline import evaluate_version, evaluation_to_run, promote_version

    if cfg.registry.model_name != model:
        raise ConfigError(
            [f"registry.model_name: the job registers '{cfg.registry.model_name}' but retrains from '{model}'"]
        )
    evaluation = evaluation_to_run(cfg)  # bad gates fail before anything is read
    client = connect(cfg.tracking.tracking_uri)
    template = traffic_experiment or (cfg.monitoring.traffic_experiment if cfg.monitoring else "traffic/{model}")
    records = [r for r in read_traffic(client, model, since, template) if r.model == model]
    used = used_traces(client, cfg.tracking.experiment, model)
    training = build_training_set(cfg, records, used)
    rated = sum(e.origin == "rated" for e in training.new)
    corrected = len(training.new) - rated
    if not training.new:
        why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in training.skipped.items() if v) or "no traffic"
        raise DataError(
            f"no new rated data for {model}: {len(records)} request(s) in the window, none rated good or corrected "
            f"that is not already trained on ({why}); nothing to retrain on"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.training.output_dir) / "retrain" / f"{job_name}-{stamp}.jsonl"
    _write(training, path)
    exp = experiment_id(client, cfg.tracking.experiment)
    tags = {
        "mlflow.runName": f"retrain {model} {stamp}",
        "mlflow.user": actor(),
        KIND_TAG: "retrain",
        FROM_TAG: model,
        **({TRIGGER_TAG: trigger_run} if trigger_run else {}),
    }
    run_id = client.create_run(exp, tags=tags).info.run_id
    try:
        _log_datasets(client, run_id, exp, training, path, f"{job_name}-retrain-{stamp}")
        params = {"examples.job": len(training.job_rows), "examples.rated": rated, "examples.corrected": corrected}
        params.update({f"skipped.{k}": v for k, v in training.skipped.items()})
        for k, v in params.items():
            client.log_param(run_id, k, str(v))
        log.info(
            "retrain %s: %d job example(s) + %d rated good + %d corrected (from %d trace(s))",
            model,
            len(training.job_rows),
            rated,
            corrected,
            len(training.trace_ids),
        )
        retrain_cfg = _retrain_config(cfg, path, run_id, len(training.new))
        job = _train(retrain_cfg, job_name, run_id, trigger_run)
        verdict = evaluate_version(retrain_cfg, job, evaluation)
        result = promote_version(retrain_cfg, job_name, job, verdict)
        outcome = {
            "tuneops.training_run": job.run_id,
            "tuneops.version": f"{job.model_name}/{job.version}" if job.version else "",
            "tuneops.verdict": verdict.outcome if verdict is not None else "not evaluated",
            "tuneops.promoted": str(result.promoted).lower(),
        }
        for k, v in outcome.items():
            client.set_tag(run_id, k, v)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return RetrainResult(run_id, len(training.job_rows) + len(training.new), rated, corrected, result)


def _retrain_config(cfg: JobConfig, path: Path, run_id: str, new: int) -> JobConfig:
    """The job on the new training file. `auto` shape: the file is chat-shaped, and a separate validation file
    keeps whatever shape it has; a `max_examples` cap grows by the new examples, so they are not cut for it."""
    columns = cfg.data.columns.model_copy(update={"messages": ColumnMap().messages})
    cap = cfg.data.max_examples + new if cfg.data.max_examples else None
    data = cfg.data.model_copy(update={"path": path, "shape": "auto", "columns": columns, "max_examples": cap})
    registry = cfg.registry.model_copy(update={"tags": {**cfg.registry.tags, RETRAIN_RUN_TAG: run_id}})
    return cfg.model_copy(update={"data": data, "registry": registry})


def _train(cfg: JobConfig, job_name: str, run_id: str, trigger_run: str | None) -> Any:
    from finetune.job import run_job

    tags = {RETRAIN_RUN_TAG: run_id, **({TRIGGER_TAG: trigger_run} if trigger_run else {})}
    return run_job(cfg, job_name, parent_run_id=run_id, run_tags=tags)
