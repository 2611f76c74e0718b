"""train -> evaluate -> gate -> `candidate` -> promote: the whole path of one job, top to bottom.

`tuneops train` runs the first two steps when the job has an `evaluation` section; `tuneops pipeline` runs
them all, and promotes to `production` when the job says `registry.promote: auto` and every gate passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from core.registry import CANDIDATE, connect, move_alias
from core.schema.job import JobConfig
from finetune.job import JobResult, run_job

if TYPE_CHECKING:
    from evaluate.verdict import Verdict

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    job: JobResult
    verdict: Verdict | None
    candidate: bool
    promoted: bool


def train_and_evaluate(cfg: JobConfig, job_name: str, resume: bool = False) -> tuple[JobResult, Verdict | None]:
    """Train, then evaluate the new version when the job asks for it; gates are parsed before training."""
    from evaluate.gates import parse_gates
    from evaluate.job import run_evaluation

    evaluation = cfg.evaluation if cfg.evaluation is not None and cfg.evaluation.on_train else None
    if evaluation is not None:
        parse_gates(evaluation)  # a gate naming an unknown metric fails now, not after an hour of training
    job = run_job(cfg, job_name, resume=resume)
    if evaluation is None or job.version is None:
        return job, None
    verdict = run_evaluation(
        f"{job.model_name}/{job.version}",
        evaluation,
        tracking_uri=cfg.tracking.tracking_uri,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
    )
    return job, verdict


def run_pipeline(cfg: JobConfig, job_name: str, resume: bool = False) -> PipelineResult:
    from evaluate.promotion import promote

    job, verdict = train_and_evaluate(cfg, job_name, resume)
    if not job.run_id:
        return PipelineResult(job, None, False, False)  # a non-main process of a distributed job
    if job.version is None or verdict is None:
        log.info("no evaluation section: the version is registered but not a candidate")
        return PipelineResult(job, verdict, False, False)
    if not verdict.passed:
        log.warning("gates failed: %s/%s stays out of production", job.model_name, job.version)
        return PipelineResult(job, verdict, False, False)
    client = connect(cfg.tracking.tracking_uri)
    move_alias(
        client,
        job.model_name,
        CANDIDATE,
        job.version,
        reason=f"pipeline {job_name}: gates passed",
        evaluation_run=verdict.evaluation_run,
    )
    promoted = False
    if cfg.registry.promote == "auto":
        promote(client, job.model_name, job.version, reason=f"pipeline {job_name}: promote auto, gates passed")
        promoted = True
    return PipelineResult(job, verdict, True, promoted)


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline_command(
        job: Annotated[Path, typer.Argument(help="Job file (YAML).")],
        overrides: Annotated[list[str] | None, typer.Argument(help="Overrides such as lora.r=8.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the job's last run.")] = False,
    ) -> None:
        """Train, evaluate, gate, mark `candidate`, and promote when the job says `registry.promote: auto`."""
        from tuneops.cli import load_job, print_result

        cfg = load_job(job, overrides)
        result = run_pipeline(cfg, job.stem, resume=resume)
        print_result(result.job)
        if result.verdict is not None:
            typer.echo(result.verdict.summary())
        state = (
            "promoted to production"
            if result.promoted
            else ("marked candidate" if result.candidate else "not promoted")
        )
        if result.job.version:
            typer.echo(f"{result.job.model_name}/{result.job.version}: {state}")
        if result.verdict is not None and not result.verdict.passed:
            raise typer.Exit(1)
