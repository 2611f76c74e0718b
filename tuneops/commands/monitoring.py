"""`tuneops monitor | retrain`: watch what the gateway serves, and train the next version from it.

`monitor` exits 1 when a check fails (after retraining, when `--retrain` names a job), so a scheduler can
alert on it; a check without enough traffic is printed as NO DATA and fails nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneops.commands.jobs import load_job
from tuneops.commands.options import JobArg, Overrides, TrackingOpt

if TYPE_CHECKING:
    from tuneops.retrain import RetrainResult

Since = Annotated[
    str | None,
    typer.Option("--since", help="Window: a duration back from now (30m, 24h, 7d) or an ISO date-time."),
]


def _print_retrain(result: RetrainResult) -> None:
    job = result.pipeline.job
    typer.echo(
        f"retrain run: {result.run_id} ({result.examples} examples: {result.rated} rated good, "
        f"{result.corrected} corrected)"
    )
    if job.run_id:
        typer.echo(f"training run: {job.run_id}")
    if result.pipeline.verdict is not None:
        typer.echo(result.pipeline.verdict.summary())
    state = "promoted to production" if result.pipeline.promoted else "marked candidate"
    if not result.pipeline.candidate:
        state = "not promoted"
    if job.version:
        typer.echo(f"{job.model_name}/{job.version}: {state}")


def monitor(
    name: Annotated[str, typer.Argument(help="Registered model name whose served traffic to check.")],
    since: Since = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Job YAML whose `monitoring` section to use.")
    ] = None,
    retrain: Annotated[
        Path | None, typer.Option("--retrain", help="Job YAML to retrain with when a check fails.")
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Check the served versions' traffic (drift, live bias, service, feedback); log a monitoring run."""
    from core.schema.monitoring import MonitoringConfig
    from evaluate.monitoring.job import run_monitoring, window_start

    job = load_job(config, None) if config else None
    retrain_job = load_job(retrain, None) if retrain else None  # a bad retrain job fails before monitoring
    cfg = (job.monitoring if job else None) or MonitoringConfig()
    uri = tracking_uri or (job.tracking.tracking_uri if job else None)
    device, dtype = (job.model.device, job.model.dtype) if job else ("auto", "auto")
    result = run_monitoring(name, cfg, since=since, tracking_uri=uri, device=device, dtype=dtype)
    typer.echo(result.summary())
    if result.failed and retrain_job is not None and retrain is not None:
        from tuneops.retrain import run_retrain

        typer.echo(f"a check failed: retraining with {retrain}")
        start = window_start(since or cfg.since, result.until)
        if uri and not retrain_job.tracking.tracking_uri:
            retrain_job.tracking.tracking_uri = uri
        _print_retrain(
            run_retrain(
                retrain_job,
                retrain.stem,
                name,
                since=start,
                trigger_run=result.run_id,
                traffic_experiment=cfg.traffic_experiment,
            )
        )
    if result.failed:
        raise typer.Exit(1)


def retrain(
    job: JobArg,
    overrides: Overrides = None,
    from_model: Annotated[str, typer.Option("--from", help="Registered model whose rated traffic to learn from.")] = "",
    since: Since = None,
    trigger_run: Annotated[
        str | None, typer.Option("--trigger-run", help="The monitoring run that asked for this retrain.")
    ] = None,
) -> None:
    """Train the next version on the job's data plus answers rated good and corrected; then gate and promote."""
    from core.errors import ConfigError
    from evaluate.monitoring.job import window_start
    from tuneops.retrain import run_retrain

    if not from_model:
        raise ConfigError(["--from NAME: the registered model whose traffic to retrain from is required"])
    cfg = load_job(job, overrides)
    start = window_start(since) if since else None
    result = run_retrain(cfg, job.stem, from_model, since=start, trigger_run=trigger_run)
    _print_retrain(result)
    if result.pipeline.verdict is not None and not result.pipeline.verdict.passed:
        raise typer.Exit(1)
