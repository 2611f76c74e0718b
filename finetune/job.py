"""A fine-tune job from top to bottom: validate, prepare data, train LoRA, log to MLflow, register.

Everything that can be checked is checked before the MLflow run starts, so bad input leaves no run behind.
A run that fails or is interrupted is marked FAILED or KILLED and registers nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.config import config_hash, flatten, resolved_dict
from core.device import choose_device, choose_dtype, dtype_name
from core.errors import ConfigError, ModelError, RegistryError
from core.models import BaseModelRef, load_causal_lm, load_tokenizer, resolve_base_model
from core.registry import Manifest, connect, git_commit, library_versions
from core.schema.job import JobConfig
from core.version import OpenedVersion, open_version
from finetune.compiled_layers import toolchain_problem
from finetune.prepare import Prepared, prepare

log = logging.getLogger(__name__)
RUN_FILE = "tuneops-run.json"  # in output_dir/<job name>/: the job's last run, for --resume
PARAM_LIMIT = 6000
INIT_FROM_TAG = "tuneops.init_from"  # NAME/VERSION of the version a warm-started run continued
INIT_FROM_RUN_TAG = "tuneops.init_from_run"  # the run that trained it: lineage that outlives the version


@dataclass
class JobResult:
    run_id: str
    experiment_id: str
    model_name: str
    version: str | None
    metrics: dict[str, float]
    tracking_uri: str
    bundle: Path | None = None  # the run's final adapter, manifest and tokenizer (main process only)


class StopRun(Exception):
    """Raised by a Trainer callback to end a run on purpose: the run is ended with `status` and tagged with
    `tags` (a pruned search trial ends KILLED and says so), registers nothing, and the exception propagates."""

    def __init__(self, message: str, status: str = "KILLED", tags: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.tags = tags or {}


@dataclass
class WarmStart:
    """The registered version `lora.init_from` names, downloaded into `folder` for as long as this object lives."""

    version: OpenedVersion
    folder: tempfile.TemporaryDirectory[str]

    @property
    def label(self) -> str:
        return self.version.label

    def tags(self) -> dict[str, str]:
        """Lineage on the run and the registered version: where the starting weights came from."""
        ref = self.version.ref
        return {INIT_FROM_TAG: self.label, INIT_FROM_RUN_TAG: ref.run_id if ref is not None else ""}


@dataclass
class Checked:
    """What validation found, reused by the job so nothing is resolved twice."""

    base: BaseModelRef
    tokenizer: Any
    data: Prepared
    init: WarmStart | None = None


def warm_start(cfg: JobConfig, base: BaseModelRef) -> WarmStart | None:
    """Resolve and download `lora.init_from` in the job's tracking store and check it fits the job.

    The version must be of the same base weights and its adapter of the job's LoRA shape
    (`finetune.recipe.warm_start_problems`); an alias is resolved once, here, so the run records the version it
    really started from.
    """
    from finetune.recipe import saved_adapter_config, skeleton, warm_start_problems

    ref = cfg.lora.init_from
    if ref is None:
        return None
    client = connect(cfg.tracking.tracking_uri)
    folder = tempfile.TemporaryDirectory(prefix="tuneops-init-from-")
    try:
        try:
            version = open_version(client, ref, Path(folder.name))
        except RegistryError as exc:
            raise ConfigError([f"lora.init_from: cannot start from '{ref}': {exc}"]) from None
        try:
            version.check_base(base)
        except ModelError as exc:
            raise ConfigError(
                [f"lora.init_from: {exc}; model.base must be the base model {ref} was trained on"]
            ) from None
        problems = warm_start_problems(
            cfg, saved_adapter_config(version), skeleton(base, cfg.model.trust_remote_code), version.label
        )
        if problems:
            raise ConfigError(problems)
    except BaseException:
        folder.cleanup()  # a refused version leaves nothing behind
        raise
    return WarmStart(version, folder)


def check(cfg: JobConfig) -> Checked:
    """Resolve the base model and `lora.init_from`, prepare the data, and check the output folder, without
    loading weights."""
    out = cfg.training.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A file of its own, gone on close: every rank of a distributed job runs this check at once.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError([f"training.output_dir: {out} is not writable ({exc.strerror})"]) from None
    if cfg.training.compile and (problem := toolchain_problem(choose_device(cfg.model.device))):
        raise ConfigError([f"training.compile: {problem}"])
    base = resolve_base_model(cfg.model.base, cfg.model.revision)
    init = warm_start(cfg, base)
    tokenizer = load_tokenizer(base)
    data = prepare(cfg.data, tokenizer)
    return Checked(base, tokenizer, data, init)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _distributed_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _params(cfg: JobConfig) -> dict[str, str]:
    """Flattened params; a value over MLflow's length limit is split into numbered parts, never cut."""
    out: dict[str, str] = {}
    for key, value in flatten(resolved_dict(cfg)).items():
        if len(value) <= PARAM_LIMIT:
            out[key] = value
        else:
            for i in range(0, len(value), PARAM_LIMIT):
                out[f"{key}.part{i // PARAM_LIMIT}"] = value[i : i + PARAM_LIMIT]
    return out


def job_dir(cfg: JobConfig, job_name: str) -> Path:
    """Where one job keeps its runs: jobs sharing an output folder never share checkpoints."""
    return cfg.training.output_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", job_name) or "job")


def run_dir(cfg: JobConfig, job_name: str, run_key: str) -> Path:
    """One run's checkpoints and final bundle."""
    return job_dir(cfg, job_name) / "runs" / run_key


def last_run(cfg: JobConfig, job_name: str) -> dict[str, str]:
    """The run --resume continues: the job's last run, refused when it was trained with another config."""
    run_file = job_dir(cfg, job_name) / RUN_FILE
    if not run_file.is_file():
        raise ConfigError([f"--resume: {run_file} not found; nothing to resume for job '{job_name}'"])
    try:
        last = json.loads(run_file.read_text())
        recorded = (str(last["run_id"]), str(last["config_hash"]))
    except (ValueError, KeyError, TypeError):
        raise ConfigError([f"--resume: {run_file} is not a tuneops run record"]) from None
    if recorded[1] != config_hash(cfg):
        raise ConfigError(
            [
                f"--resume: the last run of job '{job_name}' ({recorded[0]}) was trained with config hash "
                f"{recorded[1]}, but this job resolves to {config_hash(cfg)}; resume with the same config and "
                "overrides, or start a new run without --resume"
            ]
        )
    return last


def _start_run(
    client: Any, cfg: JobConfig, job_name: str, resume: bool, tags: dict[str, str] | None = None
) -> tuple[str, str]:
    """Create the run and record it as the job's last, or reopen the one a resumed job started."""
    import mlflow

    if resume:
        run = mlflow.start_run(run_id=last_run(cfg, job_name)["run_id"])
        return run.info.run_id, run.info.experiment_id
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    name = cfg.tracking.run_name or f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name, tags=tags)
    folder = job_dir(cfg, job_name)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run.info.run_id, "config_hash": config_hash(cfg)}
    tmp = folder / f".{RUN_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / RUN_FILE)
    return run.info.run_id, run.info.experiment_id


def _shared_run_key(main: bool, run_id: str, resume: bool, cfg: JobConfig, job_name: str) -> str:
    """The run folder's name, the same in every process of a distributed job (the main process decides)."""
    if resume:
        return last_run(cfg, job_name)["run_id"]
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return run_id
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState()  # joins the process group the Trainer will use
    key = [run_id if main else ""]
    broadcast_object_list(key, from_process=0)
    return str(key[0])


def _log_inputs(cfg: JobConfig, job_name: str, checked: Checked) -> None:
    import mlflow
    import pandas as pd

    mlflow.log_params(_params(cfg))
    mlflow.set_tags(
        {
            "tuneops.job": job_name,
            "tuneops.config_hash": config_hash(cfg),
            "tuneops.base_model": checked.base.name,
            "tuneops.base_digest": checked.base.digest,
            **(checked.init.tags() if checked.init else {}),
        }
    )
    mlflow.log_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False), "config/resolved.yaml")
    mlflow.log_dict(checked.data.report.to_dict(), "data/report.json")
    validation = "\n".join(json.dumps({"messages": t.messages}) for t in checked.data.validation)
    mlflow.log_text(validation + "\n" if validation else "", "data/validation.jsonl")
    source = ", ".join(checked.data.report.files)
    for split, rows in (("train", checked.data.train), ("validation", checked.data.validation)):
        if not rows:
            continue
        frame = pd.DataFrame({"messages": [json.dumps(r.messages) for r in rows], "source": [r.source for r in rows]})
        from_pandas = mlflow.data.from_pandas  # type: ignore[attr-defined]
        with warnings.catch_warnings():
            # MLflow registers its local-file source for both the "" and "file" schemes, so every local path
            # matches twice; the two are the same class and either is right.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            # MLflow's dataset digest calls `DataFrame.all(0)` positionally, which pandas 4 will refuse.
            warnings.filterwarnings("ignore", message="Starting with pandas version 4.0", category=DeprecationWarning)
            dataset = from_pandas(frame, source=source, name=f"{job_name}-{split}")
        mlflow.log_input(dataset, context=split)


def _lineage(client: Any, run_id: str, checked: Checked, resume: bool) -> dict[str, str]:
    """The warm start's tags for the registered version; a resumed run keeps those it recorded when it began, as
    its checkpoints continue that version even if the alias has moved since."""
    if checked.init is None:
        return {}
    tags = checked.init.tags()
    if resume:
        recorded = client.get_run(run_id).data.tags
        tags = {key: recorded.get(key, value) for key, value in tags.items()}
    return tags


def run_job(
    cfg: JobConfig,
    job_name: str,
    resume: bool = False,
    checked: Checked | None = None,
    *,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> JobResult:
    """Train one job; returns the run and the registered version.

    callbacks: extra Trainer callbacks (one may raise StopRun). parent_run_id: start the run as a child of
    that run (a search trial under its study's run). run_tags: tags set when the run starts.
    """
    import mlflow

    from core.pyfunc import publish_version, write_bundle
    from finetune.callbacks import MlflowMetrics, Progress, Throughput
    from finetune.recipe import attach_lora, make_trainer

    checked = checked or check(cfg)
    main = _distributed_rank() == 0  # under `accelerate launch`, only the main process talks to MLflow
    client = connect(cfg.tracking.tracking_uri) if main else None  # fails fast on an unreachable server
    log.info("data: %s", checked.data.report.summary())
    device = choose_device(cfg.model.device)
    dtype = choose_dtype(cfg.model.dtype, device)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a stopped job is marked KILLED, not left RUNNING
    run_id, experiment_id = ("", "")
    if main:
        parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run_id, experiment_id = _start_run(client, cfg, job_name, resume, {**(run_tags or {}), **parent})
    try:
        folder = run_dir(cfg, job_name, _shared_run_key(main, run_id, resume, cfg, job_name))
        if main and not resume:
            _log_inputs(cfg, job_name, checked)
        log.info("loading %s on %s in %s", checked.base.name, device, dtype_name(dtype))
        from transformers import set_seed

        set_seed(cfg.training.seed)  # LoRA's A matrices are drawn here, before the Trainer seeds anything
        base = load_causal_lm(checked.base, device, dtype, cfg.model.quantization, cfg.model.trust_remote_code)
        model = attach_lora(base, cfg, checked.init.version if checked.init else None)
        trainable, total = model.get_nb_trainable_parameters()
        log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
        own = [Throughput(), Progress()] + ([MlflowMetrics(client, run_id)] if main else [])
        trainer = make_trainer(
            cfg,
            model,
            checked.tokenizer,
            checked.data.train,
            checked.data.validation,
            folder / "checkpoints",
            device,
            dtype,
            own + (callbacks or []),
        )
        log.info("training on %d process(es)", trainer.args.world_size)
        if main:
            attention = getattr(trainer, "attention", "n/a")  # what make_trainer chose
            mlflow.set_tags({"tuneops.world_size": str(trainer.args.world_size), "tuneops.attention": attention})
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
        if checked.data.validation:
            metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, int | float)})
        version = None
        if main:
            mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items()})
            manifest = Manifest(
                base_model=checked.base.name,
                base_digest=checked.base.digest,
                chat_template=checked.tokenizer.chat_template,
                eos_token=checked.tokenizer.eos_token,
                system_prompt=cfg.data.system_prompt,
                max_length=cfg.data.max_length,
                config_hash=config_hash(cfg),
                job_name=job_name,
                libraries=library_versions(),
                git_commit=git_commit(),
            )
            bundle = write_bundle(folder / "final", trainer.model, checked.tokenizer, manifest)
            mlflow.log_artifacts(str(bundle / "adapter"), "adapter")
            mlflow.log_text(manifest.to_json(), "manifest.json")
            if cfg.registry.register_version:
                tags = {
                    "tuneops.config_hash": manifest.config_hash,
                    "tuneops.base_model": manifest.base_model,
                    **_lineage(client, run_id, checked, resume),
                    **cfg.registry.tags,
                }
                version = str(publish_version(bundle, cfg.registry.model_name, tags=tags).version)
                log.info("registered %s version %s", cfg.registry.model_name, version)
            mlflow.end_run("FINISHED")
        return JobResult(
            run_id,
            experiment_id,
            cfg.registry.model_name,
            version,
            metrics,
            mlflow.get_tracking_uri(),
            folder / "final" if main else None,
        )
    except StopRun as stop:
        if main:
            mlflow.set_tags(stop.tags)
            mlflow.end_run(stop.status)
        raise
    except KeyboardInterrupt:
        if main:
            mlflow.end_run("KILLED")
        raise
    except BaseException:
        if main:
            mlflow.end_run("FAILED")
        raise
