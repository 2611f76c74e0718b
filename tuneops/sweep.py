"""`tuneops sweep`: a hyperparameter search over one job, on Optuna, recorded in MLflow.

The study is one Optuna study in a storage (a SQLite file in `training.output_dir/sweep/` by default, or
PostgreSQL for several machines) and one parent MLflow run; each trial is a job run by `finetune.job.run_job`
as a child run of it, in its own output folder, registering nothing. A trial reports its validation loss at
each evaluation, so the pruner can stop it: it ends KILLED, tagged `tuneops.trial_state=PRUNED`.

Everything lives in the storage (the parent run id is a study attribute, each trial's run id a trial
attribute), so a stopped sweep continues where it stopped and workers join the same study. Only the
coordinating process (`tuneops sweep`, not `--worker`) finishes a study: it waits for the trials other workers
are running, logs the charts and the importance table, and registers the best trial's adapter as the one
version, which then goes the pipeline's way: evaluate -> gate -> `candidate` -> promote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from transformers import TrainerCallback

from core.config import resolved_dict
from core.errors import ConfigError, DataError
from core.registry import ADAPTER_DIR, MANIFEST_FILE, connect, tracking_uri
from core.schema.job import JobConfig
from core.schema.sweep import Distribution, SweepConfig
from finetune.job import (
    INIT_FROM_RUN_TAG,
    INIT_FROM_TAG,
    RUN_FILE,
    Checked,
    JobResult,
    StopRun,
    check,
    job_dir,
    run_job,
)
from tuneops.pipeline import PipelineResult, evaluate_version, evaluation_to_run, promote_version

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from core.schema.evaluation import EvaluationConfig

log = logging.getLogger(__name__)

PARENT_ATTR = "tuneops.parent_run_id"  # study attribute: the study's MLflow run
FINGERPRINT_ATTR = "tuneops.fingerprint"  # study attribute: what the trials mean (job, space, objective)
REGISTERED_ATTR = "tuneops.registered"  # study attribute: {trial, model, version} of the registered best
SETTLED_ATTR = "tuneops.settled"  # study attribute: NAME/VERSION once evaluated, gated and promoted
RUN_ATTR = "tuneops.run_id"  # trial attribute: the trial's MLflow run
OWNER_ATTR = "tuneops.owner"  # trial attribute: host:pid of the process training it
SURPLUS_ATTR = "tuneops.surplus"  # trial attribute: started after the budget was taken by other workers
STATE_TAG = "tuneops.trial_state"  # run tag: COMPLETE, PRUNED or FAIL (MLflow has no PRUNED status)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_WAIT_S = 60.0
WORKERS_POLL_S = 5.0
HEARTBEAT_S = 60


@dataclass
class TrialSummary:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run_id: str
    seconds: float | None
    pruned_at: int | None = None

    def describe(self, objective: str) -> str:
        value = "" if self.value is None else f"{objective} {self.value:.4g}"
        if self.state == "PRUNED":
            value = f"at step {self.pruned_at}" if self.pruned_at is not None else ""
        params = "  ".join(f"{k}={_show(v)}" for k, v in self.params.items())
        took = f"  {self.seconds:.0f} s" if self.seconds is not None else ""
        return f"trial {self.number:<3} {self.state:<8} {value:<22} {params}{took}"


@dataclass
class SweepResult:
    study_name: str
    storage: str  # password hidden
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    objective: str
    direction: str
    trials: list[TrialSummary] = field(default_factory=list)
    best: TrialSummary | None = None
    importances: dict[str, float] | None = None
    importance_note: str = ""
    charts: list[str] = field(default_factory=list)
    outcome: PipelineResult | None = None  # the best trial's version through evaluate -> gate -> promote
    settled_before: bool = False  # an earlier run already evaluated and promoted that version

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Pruned(StopRun, optuna.TrialPruned):
    """Ends the trial's run KILLED and tagged PRUNED, and tells Optuna the trial was pruned."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            f"pruned at step {step} (eval_loss {loss:.4g})",
            status="KILLED",
            tags={STATE_TAG: "PRUNED", "tuneops.pruned_at_step": str(step)},
        )
        self.step = step


class _Surplus(Exception):
    """A trial that started when the budget was already taken by trials of other workers."""


class PruningReport(TrainerCallback):
    """Reports each validation loss to the Optuna trial and stops the run when the pruner says so.

    The trial's run id is recorded on the trial as soon as training starts. Values are negated for a study
    that maximises (a score), so the pruner compares losses the right way round. The evaluation after the
    last step is reported but never pruned: the trial has already paid for its training.
    """

    def __init__(self, trial: optuna.Trial, run_file: Path, sign: float) -> None:
        self.trial = trial
        self.run_file = run_file
        self.sign = sign

    def on_train_begin(self, args, state, control, **kw: Any):  # type: ignore[no-untyped-def]
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.trial.set_user_attr(RUN_ATTR, json.loads(self.run_file.read_text())["run_id"])

    def on_evaluate(self, args, state, control, metrics=None, **kw: Any):  # type: ignore[no-untyped-def]
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a step reported twice (the final evaluation)
            self.trial.report(self.sign * float(loss), state.global_step)
        if state.global_step < state.max_steps and self.trial.should_prune():
            raise _Pruned(state.global_step, float(loss))


def hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("://", 1)[0] + "://..."


def fingerprint(cfg: JobConfig) -> str:
    """What a study's trials mean: the job, the search space and the objective; not where or how long it runs."""
    sweep = cfg.sweep
    assert sweep is not None
    data = resolved_dict(cfg)
    evaluation = data.pop("evaluation") or {}
    data.pop("registry")
    data["training"].pop("output_dir")
    data["tracking"] = {"experiment": cfg.tracking.experiment}
    data["sweep"] = {"params": sweep.params, "objective": sweep.objective, "direction": sweep.goal}
    if sweep.objective != "eval_loss":
        from core.schema.evaluation import EvaluationConfig

        scoring = {**EvaluationConfig().model_dump(mode="json"), **evaluation}
        keys = ("max_examples", "max_new_tokens", "batch_size", "exact_match_max_words")
        data["quality"] = {k: scoring[k] for k in keys}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def trial_config(cfg: JobConfig, values: dict[str, Any], out: Path, name: str) -> JobConfig:
    """The job one trial trains: the searched values set, its own folder, no version, no sweep section."""
    data = resolved_dict(cfg)
    for key, value in values.items():
        section, name_in = key.split(".", 1)
        data[section][name_in] = value
    data["training"]["output_dir"] = str(out)
    data["registry"]["register_version"] = False
    data["tracking"]["run_name"] = name
    data["sweep"] = None
    return JobConfig.model_validate(data)


def _storable(choices: tuple[Any, ...]) -> bool:
    """Whether Optuna can store these choices as they are (scalars), rather than as JSON text."""
    return all(c is None or isinstance(c, bool | int | float | str) for c in choices)


def suggest(trial: optuna.Trial, key: str, dist: Distribution) -> Any:
    """Draw one value; choices that Optuna cannot store (lists) travel as JSON text."""
    if dist.kind == "log_uniform":
        return trial.suggest_float(key, dist.low, dist.high, log=True)
    if dist.kind == "uniform":
        return trial.suggest_float(key, dist.low, dist.high)
    if dist.kind == "int":
        return trial.suggest_int(key, int(dist.low), int(dist.high))
    if _storable(dist.choices):
        return trial.suggest_categorical(key, list(dist.choices))
    picked = trial.suggest_categorical(key, [json.dumps(c) for c in dist.choices])
    return json.loads(str(picked))


def _decoded(params: dict[str, Any], space: dict[str, Distribution]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        dist = space.get(key)
        encoded = dist is not None and dist.kind == "choice" and not _storable(dist.choices)
        out[key] = json.loads(value) if encoded and isinstance(value, str) else value
    return out


@dataclass
class _Study:
    """One invocation's view of the study and where everything goes."""

    cfg: JobConfig
    sweep: SweepConfig
    job_name: str
    study: optuna.Study
    storage: optuna.storages.RDBStorage
    client: MlflowClient
    parent_run_id: str
    experiment_id: str
    folder: Path
    checked: Checked
    space: dict[str, Distribution]
    owner: str
    report: Callable[[str], None]
    validation_file: Path | None = None
    current: int | None = None  # the trial this process is training

    @property
    def sign(self) -> float:
        return -1.0 if self.sweep.goal == "maximize" else 1.0

    def summary(self, t: FrozenTrial) -> TrialSummary:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        pruned_at = max(t.intermediate_values) if t.state == TrialState.PRUNED and t.intermediate_values else None
        return TrialSummary(
            t.number,
            t.state.name,
            t.value if t.state == TrialState.COMPLETE else None,
            _decoded(t.params, self.space),
            str(t.user_attrs.get(RUN_ATTR, "")),
            seconds,
            pruned_at,
        )

    def finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED_STATES))

    def objective(self, trial: optuna.Trial) -> float:
        budget = self.sweep.n_trials
        if budget is not None:
            taken = self.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
            if sum(t.number < trial.number for t in taken) >= budget:
                trial.set_user_attr(SURPLUS_ATTR, True)
                raise _Surplus
        self.current = trial.number
        trial.set_user_attr(OWNER_ATTR, self.owner)
        values = {key: suggest(trial, key, dist) for key, dist in self.space.items()}
        out = self.folder / f"trial-{trial.number:04d}"
        out.mkdir(parents=True, exist_ok=True)
        cfg = trial_config(self.cfg, values, out, f"{self.study.study_name}-trial-{trial.number}")
        tags = {
            "tuneops.sweep.study": self.study.study_name,
            "tuneops.sweep.trial": str(trial.number),
            STATE_TAG: "RUNNING",
        }
        run_file = job_dir(cfg, self.job_name) / RUN_FILE
        callback = PruningReport(trial, run_file, self.sign)
        try:
            result = run_job(
                cfg,
                self.job_name,
                checked=self.checked,
                callbacks=[callback],
                parent_run_id=self.parent_run_id,
                run_tags=tags,
            )
        except _Pruned:
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # the run exists once its record does
                self.client.set_tag(json.loads(run_file.read_text())["run_id"], STATE_TAG, "FAIL")
            raise
        finally:
            for checkpoints in out.glob("*/runs/*/checkpoints"):  # a trial is never resumed
                shutil.rmtree(checkpoints, ignore_errors=True)
        trial.set_user_attr(RUN_ATTR, result.run_id)
        value = self._value(cfg, result)
        self.client.set_tag(result.run_id, STATE_TAG, "COMPLETE")
        self.client.log_metric(result.run_id, f"objective.{self.sweep.objective}", value)
        return value

    def _value(self, cfg: JobConfig, result: JobResult) -> float:
        metric = self.sweep.objective
        if metric == "eval_loss":
            if "eval_loss" not in result.metrics:
                raise DataError("the trial reported no eval_loss: the job has no held-out split")
            return result.metrics["eval_loss"]
        assert result.bundle is not None  # a single process trains a trial, so it wrote the bundle
        return self._quality(cfg, result.bundle, result.run_id)

    def _quality(self, cfg: JobConfig, bundle: Path, run_id: str) -> float:
        """A quality metric of the trial's adapter on the held-out split, as evaluation measures it."""
        from core.schema.evaluation import EvaluationConfig
        from core.version import OpenedVersion
        from evaluate.quality import run_quality
        from evaluate.readers import read_quality
        from evaluate.subjects import MODEL, load_subjects

        scoring = cfg.evaluation or EvaluationConfig()
        if self.validation_file is None:
            self.validation_file = self.folder / "validation.jsonl"
            rows = (json.dumps({"messages": t.messages}) for t in self.checked.data.validation)
            self.validation_file.write_text("".join(r + "\n" for r in rows))
        items = read_quality(self.validation_file, scoring.max_examples)
        opened = OpenedVersion.read(bundle, label=f"{cfg.tracking.run_name}")
        subjects = load_subjects(opened, None, False, cfg.model.device, cfg.model.dtype)
        result = run_quality(subjects, items, scoring.max_new_tokens, scoring.batch_size, scoring.exact_match_max_words)
        metrics = result.metrics[MODEL]
        self.client.log_batch(
            run_id,
            metrics=[_metric(f"quality.{k}", m.value) for k, m in metrics.items()],
            synchronous=True,
        )
        if self.sweep.objective not in metrics:
            raise DataError(
                f"{self.sweep.objective} needs held-out answers of at most {scoring.exact_match_max_words} words; "
                "none are that short"
            )
        return float(metrics[self.sweep.objective].value)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """One progress line per trial, and the trial's value on the parent run (the optimisation history)."""
        summary = self.summary(trial)
        budget = f"/{self.sweep.n_trials}" if self.sweep.n_trials else ""
        best = ""
        if trial.state == TrialState.COMPLETE and summary.value is not None:
            self.client.log_metric(
                self.parent_run_id, f"trial_{self.sweep.objective}", summary.value, step=trial.number
            )
            with contextlib.suppress(ValueError):
                if study.best_trial.number == trial.number:
                    best = "  best so far"
                self.client.log_metric(
                    self.parent_run_id, f"best_{self.sweep.objective}", study.best_value, step=trial.number
                )
        self.report(f"[{self.finished()}{budget}] {summary.describe(self.sweep.objective)}{best}")


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _storage(sweep: SweepConfig, folder: Path) -> tuple[str, optuna.storages.RDBStorage]:
    """Open (and on first use create) the study's storage; workers starting together may race to create
    its tables, so a database error is retried before it is reported."""
    from sqlalchemy.exc import SQLAlchemyError

    url = sweep.storage or f"sqlite:///{(folder / 'optuna.db').resolve()}"
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S
                )
            return url, storage
        except ImportError as exc:
            raise ConfigError(
                [
                    f"sweep.storage: {hide_password(url)} needs a database driver ({exc}); for PostgreSQL install "
                    "tuneops[postgres]"
                ]
            ) from None
        except SQLAlchemyError as exc:
            if attempt == 2:
                raise ConfigError(
                    [f"sweep.storage: cannot open {hide_password(url)}: {type(exc).__name__}: {exc.args[0]}"]
                ) from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _sampler(sweep: SweepConfig, study_trials: int, worker: bool) -> optuna.samplers.BaseSampler:
    """Seeded so a study draws the same trials; offset by the trials already drawn (a rerun must not draw
    trial 0 again) and, for a worker, by host and pid (two workers must not draw the same trials)."""
    seed = sweep.seed + study_trials
    if worker:
        seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    seed %= 2**32
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(cfg: JobConfig) -> optuna.pruners.BasePruner:
    sweep = cfg.sweep
    assert sweep is not None
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=sweep.pruner_warmup_steps
        )
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.training.eval_steps)
    return optuna.pruners.NopPruner()


def _experiment(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _create_parent(client: MlflowClient, cfg: JobConfig, job_name: str, study: optuna.Study, storage: str) -> str:
    from mlflow.entities import Param

    sweep = cfg.sweep
    assert sweep is not None
    experiment_id = _experiment(client, cfg.tracking.experiment)
    name = cfg.tracking.run_name or f"{job_name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "tuneops.job": job_name,
            "tuneops.sweep.study": study.study_name,
            "tuneops.sweep.storage": storage,
        },
    )
    run_id = run.info.run_id
    params = {f"sweep.params.{k}": v for k, v in sweep.params.items()}
    params |= {
        "sweep.objective": sweep.objective,
        "sweep.direction": sweep.goal,
        "sweep.sampler": sweep.sampler,
        "sweep.seed": str(sweep.seed),
        "sweep.pruner": sweep.pruner,
    }
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], synchronous=True)
    import yaml

    client.log_text(run_id, yaml.safe_dump(resolved_dict(cfg), sort_keys=False), "config/job.yaml")
    return str(run_id)


def _parent_run(
    client: MlflowClient, cfg: JobConfig, job_name: str, study: optuna.Study, created: bool, storage: str
) -> str:
    """The study's MLflow run: created by whoever created the study; others wait for its id to appear."""
    if not created:
        deadline = time.monotonic() + PARENT_WAIT_S
        while PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(1.0)
        if PARENT_ATTR in study.user_attrs:
            return str(study.user_attrs[PARENT_ATTR])
        log.warning("study %s has no MLflow run after %.0f s; starting one", study.study_name, PARENT_WAIT_S)
    run_id = _create_parent(client, cfg, job_name, study, storage)
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _open_study(
    cfg: JobConfig, job_name: str, folder: Path, worker: bool
) -> tuple[optuna.Study, optuna.storages.RDBStorage, str, bool]:
    sweep = cfg.sweep
    assert sweep is not None
    url, storage = _storage(sweep, folder)
    name = sweep.study_name or job_name
    pruner = _pruner(cfg)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=sweep.goal, sampler=_sampler(sweep, 0, worker), pruner=pruner
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        probe = optuna.load_study(study_name=name, storage=storage)
        sampler = _sampler(sweep, len(probe.get_trials(deepcopy=False)), worker)
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    mine = fingerprint(cfg)
    theirs = study.user_attrs.get(FINGERPRINT_ATTR)
    if theirs is None:
        study.set_user_attr(FINGERPRINT_ATTR, mine)
    elif theirs != mine:
        raise ConfigError(
            [
                f"sweep: study '{name}' in {hide_password(url)} searches another job, space or objective; rerun "
                "with the job it was started with, or set sweep.study_name to start a new study"
            ]
        )
    return study, storage, url, created


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's trials go stale through the heartbeat
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_trial_run(client: MlflowClient, run_id: str, state: str) -> None:
    """A trial whose process died: its MLflow run, left RUNNING, ends KILLED with the trial's state."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    with contextlib.suppress(MlflowException):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, STATE_TAG, state)
            client.set_terminated(run_id, "KILLED")


def _fail_dead_trials(s: _Study) -> None:
    """Trials left RUNNING by a process of this machine that no longer exists failed; their runs end KILLED."""
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get(OWNER_ATTR, ""))
        if owner and not _alive(owner):
            log.info("trial %d: its process (%s) is gone; marking it failed", t.number, owner)
            s.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            _end_trial_run(s.client, str(t.user_attrs.get(RUN_ATTR, "")), "FAIL")


def _optimize(s: _Study, deadline: float | None) -> None:
    """Run trials until the budget (trials finished in the study, or this invocation's time) is spent."""
    budget = s.sweep.n_trials
    while deadline is None or time.monotonic() < deadline:
        taken = s.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
        if budget is not None and len(taken) >= budget:
            return
        s.current = None
        try:
            s.study.optimize(s.objective, n_trials=1, callbacks=[s.after_trial], gc_after_trial=True)
        except _Surplus:
            return
        except BaseException:
            if s.current is not None:  # the trial is told FAIL before the error reaches here
                s.after_trial(s.study, s.study.get_trials(deepcopy=False)[s.current])
            raise


def _wait_for_workers(s: _Study) -> None:
    """The coordinator picks the best trial only after the trials other workers are running have ended."""
    announced = -1
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(s.study)
        running = s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if len(running) != announced:
            announced = len(running)
            s.report(f"waiting for {len(running)} trial(s) running elsewhere: {[t.number for t in running]}")
        time.sleep(WORKERS_POLL_S)


def _charts(s: _Study, result: SweepResult) -> None:
    """Optimisation history, intermediate values and (with two or more completed trials) importances, as PNGs
    on the parent run; the importance table as JSON beside them."""
    complete = s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    evaluator = None
    if len(complete) >= 2:
        from optuna.importance import FanovaImportanceEvaluator

        evaluator = FanovaImportanceEvaluator(seed=s.sweep.seed)
        try:
            result.importances = optuna.importance.get_param_importances(s.study, evaluator=evaluator)
        except (RuntimeError, ValueError) as exc:
            result.importance_note = f"parameter importance could not be computed: {exc}"
    else:
        result.importance_note = f"parameter importance needs at least 2 completed trials (have {len(complete)})"
    if result.importances is not None:
        s.client.log_dict(s.parent_run_id, result.importances, "importance.json")
    frame = s.study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", "user_attrs"))
    s.client.log_text(s.parent_run_id, frame.to_csv(index=False), "trials.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots
    except ImportError:
        result.importance_note += " (matplotlib is not installed: no charts)"
        return
    target = s.sweep.objective
    charts: list[tuple[str, Callable[[], Any]]] = [
        ("optimization_history", lambda: plots.plot_optimization_history(s.study, target_name=target)),
        ("intermediate_values", lambda: plots.plot_intermediate_values(s.study)),
    ]
    if result.importances is not None:
        charts.append(
            (
                "param_importances",
                lambda: plots.plot_param_importances(s.study, evaluator=evaluator, target_name=target),
            )
        )
    folder = s.folder / "charts"
    folder.mkdir(exist_ok=True)
    for name, plot in charts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = plot()
            except (ValueError, RuntimeError) as exc:
                log.warning("chart %s not drawn: %s", name, exc)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        s.client.log_artifact(s.parent_run_id, str(path), "charts")
        result.charts.append(f"charts/{path.name}")


def _bundle(s: _Study, trial: TrialSummary, tmp: Path) -> Path:
    """The best trial's bundle: its folder on this machine, else its run's logged adapter and manifest."""
    import mlflow

    for local in (s.folder / f"trial-{trial.number:04d}").glob(f"*/runs/{trial.run_id}/final"):
        if (local / MANIFEST_FILE).is_file() and (local / ADAPTER_DIR).is_dir():
            return local
    mlflow.artifacts.download_artifacts(run_id=trial.run_id, artifact_path=ADAPTER_DIR, dst_path=str(tmp))
    mlflow.artifacts.download_artifacts(run_id=trial.run_id, artifact_path=MANIFEST_FILE, dst_path=str(tmp))
    return tmp


def _register_best(s: _Study, best: TrialSummary) -> JobResult:
    """Register the best trial's adapter as a version of the job's model, from inside the trial's run.

    Once per best trial: a rerun finds the version in the study's attributes instead of registering again.
    """
    import mlflow

    from core.pyfunc import publish_version
    from core.registry import Manifest

    run = s.client.get_run(best.run_id)
    metrics = {k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_")}
    model_name = s.cfg.registry.model_name
    done = s.study.user_attrs.get(REGISTERED_ATTR) or {}
    if done.get("trial") == best.number and done.get("model") == model_name:
        version = str(done["version"])
    else:
        with tempfile.TemporaryDirectory(prefix="tuneops-sweep-") as tmp:
            bundle = _bundle(s, best, Path(tmp))
            manifest = Manifest.read(bundle / MANIFEST_FILE)
            tags = {
                "tuneops.config_hash": manifest.config_hash,
                "tuneops.base_model": manifest.base_model,
                "tuneops.sweep.study": s.study.study_name,
                "tuneops.sweep.trial": str(best.number),
                # a warm-started trial names the version it continued, as a plain job's version does
                **{k: v for k, v in run.data.tags.items() if k in (INIT_FROM_TAG, INIT_FROM_RUN_TAG)},
                **s.cfg.registry.tags,
            }
            with mlflow.start_run(run_id=best.run_id):
                version = str(publish_version(bundle, model_name, tags=tags).version)
        s.study.set_user_attr(REGISTERED_ATTR, {"trial": best.number, "model": model_name, "version": version})
        s.client.set_tag(s.parent_run_id, "tuneops.sweep.version", f"{model_name}/{version}")
        log.info("registered %s version %s from trial %d", model_name, version, best.number)
    return JobResult(best.run_id, run.info.experiment_id, model_name, version, metrics, mlflow.get_tracking_uri())


def _finish(s: _Study, result: SweepResult, evaluation: EvaluationConfig | None) -> None:
    """Charts and importance on the parent run; the best trial registered, evaluated, gated, promoted.

    A rerun after all that only redraws the charts: the version was already evaluated and its aliases moved.
    """
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        _end_trial_run(s.client, str(t.user_attrs.get(RUN_ATTR, "")), "FAIL")
    _charts(s, result)
    if not s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        s.client.set_tag(s.parent_run_id, "tuneops.sweep.best_trial", "none")
        return
    best = s.summary(s.study.best_trial)
    result.best = best
    s.client.set_tag(s.parent_run_id, "tuneops.sweep.best_trial", str(best.number))
    s.client.set_tag(s.parent_run_id, "tuneops.sweep.best_run", best.run_id)
    summary = {"trial": best.number, "run_id": best.run_id, "value": best.value, "params": best.params}
    s.client.log_dict(s.parent_run_id, summary, "best.json")
    job = _register_best(s, best)
    settled = s.study.user_attrs.get(SETTLED_ATTR)
    if settled == f"{job.model_name}/{job.version}":
        result.outcome = PipelineResult(job, None, False, False)
        result.settled_before = True
        return
    verdict = evaluate_version(s.cfg, job, evaluation)
    result.outcome = promote_version(s.cfg, f"{s.job_name} (sweep best trial {best.number})", job, verdict)
    s.study.set_user_attr(SETTLED_ATTR, f"{job.model_name}/{job.version}")


def run_sweep(
    cfg: JobConfig, job_name: str, worker: bool = False, report: Callable[[str], None] | None = None
) -> SweepResult:
    """Search the job's `sweep` space; returns every trial, the best, importances, and its version's fate.

    worker: run trials only (another process, `tuneops sweep` without --worker, finishes the study).
    report: receives one line per trial and notices; default the log.
    Raises ConfigError for a job without a `sweep` section or a study of another search, before training.
    """
    sweep = cfg.sweep
    if sweep is None:
        raise ConfigError(
            ["the job has no `sweep` section: add one naming the keys to search (see configs/sweep.yaml)"]
        )
    say = report or log.info
    evaluation = None if worker else evaluation_to_run(cfg)  # gates are parsed before anything trains
    space = sweep.space()
    checked = check(cfg)
    folder = cfg.training.output_dir / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    client = connect(cfg.tracking.tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a stopped sweep fails its trial and can be rerun
    study, storage, url, created = _open_study(cfg, job_name, folder, worker)
    parent = _parent_run(client, cfg, job_name, study, created, hide_password(url))
    parent_run = client.get_run(parent)
    s = _Study(
        cfg,
        sweep,
        job_name,
        study,
        storage,
        client,
        parent,
        parent_run.info.experiment_id,
        folder,
        checked,
        space,
        f"{socket.gethostname()}:{os.getpid()}",
        say,
    )
    result = SweepResult(
        study.study_name,
        hide_password(url),
        parent,
        parent_run.info.experiment_id,
        tracking_uri(cfg.tracking.tracking_uri),
        sweep.objective,
        sweep.goal,
    )
    if not worker and parent_run.info.status != "RUNNING":
        client.update_run(parent, status="RUNNING")
    _fail_dead_trials(s)
    done = s.finished()
    say(
        f"study {study.study_name} ({result.storage}): {done} trial(s) finished"
        + (f" of {sweep.n_trials}" if sweep.n_trials else "")
        + f"; MLflow run {parent}"
    )
    deadline = time.monotonic() + sweep.timeout_minutes * 60 if sweep.timeout_minutes else None
    try:
        _optimize(s, deadline)
        if not worker:
            _wait_for_workers(s)
            _finish(s, result, evaluation)
    except KeyboardInterrupt:
        if not worker:
            client.set_terminated(parent, "KILLED")
        raise
    except BaseException:
        if not worker:
            client.set_terminated(parent, "FAILED")
        raise
    result.trials = [s.summary(t) for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    if not worker:
        client.set_terminated(parent, "FINISHED")
    return result
