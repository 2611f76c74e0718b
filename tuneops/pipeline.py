"""train -> evaluate -> gate -> `candidate` -> promote: the whole path of one job, top to bottom.

`tuneops train` runs the first two steps when the job has an `evaluation` section; `tuneops pipeline` runs
them all, and promotes to `production` when the job says `registry.promote: auto` and every gate passed. An
evaluation with no gates makes a candidate but never an automatic promotion: it checked nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core import aliases
from core.registry import connect
from core.schema.job import JobConfig
from finetune.job import JobResult, run_job

if TYPE_CHECKING:
    from core.schema.evaluation import EvaluationConfig
    from evaluate.verdict import Verdict

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    job: JobResult
    verdict: Verdict | None
    candidate: bool
    promoted: bool


def evaluation_to_run(cfg: JobConfig) -> EvaluationConfig | None:
    """The evaluation a new version gets, with its gates parsed now: an unknown metric fails before training."""
    from evaluate.gates import parse_gates

    evaluation = cfg.evaluation if cfg.evaluation is not None and cfg.evaluation.on_train else None
    if evaluation is not None:
        parse_gates(evaluation)
    return evaluation


def evaluate_version(cfg: JobConfig, job: JobResult, evaluation: EvaluationConfig | None) -> Verdict | None:
    """Evaluate the version a job registered (None when it registered none or has nothing to evaluate)."""
    from evaluate.job import run_evaluation

    if evaluation is None or job.version is None:
        return None
    return run_evaluation(
        f"{job.model_name}/{job.version}",
        evaluation,
        tracking_uri=cfg.tracking.tracking_uri,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
    )


def train_and_evaluate(cfg: JobConfig, job_name: str, resume: bool = False) -> tuple[JobResult, Verdict | None]:
    """Train, then evaluate the new version when the job asks for it; gates are parsed before training."""
    evaluation = evaluation_to_run(cfg)
    job = run_job(cfg, job_name, resume=resume)
    return job, evaluate_version(cfg, job, evaluation)


def run_pipeline(cfg: JobConfig, job_name: str, resume: bool = False) -> PipelineResult:
    job, verdict = train_and_evaluate(cfg, job_name, resume)
    return promote_version(cfg, job_name, job, verdict)


def promote_version(cfg: JobConfig, job_name: str, job: JobResult, verdict: Verdict | None) -> PipelineResult:
    """Gate -> `candidate` -> promote: the pipeline's steps after evaluation, for any job's new version."""
    if not job.run_id:
        return PipelineResult(job, None, False, False)  # a non-main process of a distributed job
    if job.version is None or verdict is None:
        log.info("no evaluation section: the version is registered but not a candidate")
        return PipelineResult(job, verdict, False, False)
    if verdict.outcome == aliases.FAIL:
        log.warning("gates failed: %s/%s stays out of production", job.model_name, job.version)
        return PipelineResult(job, verdict, False, False)
    client = connect(cfg.tracking.tracking_uri)
    gated = verdict.outcome == aliases.PASS
    why = "gates passed" if gated else "evaluated with no gates"
    aliases.candidate(client, job.model_name, job.version, reason=f"pipeline {job_name}: {why}")
    if cfg.registry.promote != "auto":
        return PipelineResult(job, verdict, True, False)
    if not gated:
        log.warning(
            "%s/%s: no gates configured, so `registry.promote: auto` does not promote it "
            "(add gates, or `tuneops promote --force --reason`)",
            job.model_name,
            job.version,
        )
        return PipelineResult(job, verdict, True, False)
    aliases.promote(client, job.model_name, job.version, reason=f"pipeline {job_name}: promote auto, gates passed")
    return PipelineResult(job, verdict, True, True)
