"""`tuneops sweep`: a hyperparameter search over a job's `sweep` section, one MLflow run per trial.

It exits 1 when no trial completed or the best trial's version failed a gate, as `tuneops pipeline` does.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tuneops.commands.options import JobArg, Overrides


def sweep(
    job: JobArg,
    overrides: Overrides = None,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker",
            help="Only run trials of the shared study (sweep.storage); `tuneops sweep` without it finishes it.",
        ),
    ] = False,
) -> None:
    """Search the job's `sweep` space with Optuna; register, evaluate and gate the best trial's adapter.

    Each trial is a child MLflow run of the study's run; a rerun continues the study where it stopped.
    """
    from tuneops.commands.jobs import load_job
    from tuneops.sweep import run_sweep

    cfg = load_job(job, overrides)
    result = run_sweep(cfg, job.stem, worker=worker, report=typer.echo)
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.counts().items()))
    typer.echo(f"study {result.study_name}: {counts or 'no trials'}")
    uri = result.tracking_uri
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
    typer.echo(f"MLflow UI: {ui}  then open #/experiments/{result.experiment_id}/runs/{result.parent_run_id}")
    if worker:
        return
    if result.best is None:
        typer.echo("no trial completed: nothing to register")
        raise typer.Exit(1)
    best = result.best
    typer.echo(f"best:     trial {best.number}, {result.objective} {best.value:.4g} (run {best.run_id})")
    for key, value in best.params.items():
        typer.echo(f"  {key} = {value}")
    if result.importances:
        typer.echo("importance:")
        for key, share in result.importances.items():
            typer.echo(f"  {share:6.1%}  {key}")
    else:
        typer.echo(result.importance_note)
    if result.charts:
        typer.echo(f"charts:   {', '.join(f'runs:/{result.parent_run_id}/{c}' for c in result.charts)}")
    outcome = result.outcome
    if outcome is None or outcome.job.version is None:
        return
    label = f"{outcome.job.model_name}/{outcome.job.version}"
    typer.echo(f"version:  models:/{label}")
    if result.settled_before:
        typer.echo(f"{label}: evaluated and gated by an earlier run (`tuneops history {outcome.job.model_name}`)")
        return
    if outcome.verdict is not None:
        typer.echo(outcome.verdict.summary())
    state = (
        "promoted to production" if outcome.promoted else "marked candidate" if outcome.candidate else "not promoted"
    )
    typer.echo(f"{label}: {state}")
    if outcome.verdict is not None and not outcome.verdict.passed:
        raise typer.Exit(1)
