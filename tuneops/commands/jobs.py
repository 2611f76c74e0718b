"""`tuneops train | pipeline | validate | data | models`: commands that read a job file or the model catalogue."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from tuneops.commands.options import JobArg, Overrides

if TYPE_CHECKING:
    from pathlib import Path

    from core.schema.job import JobConfig
    from finetune.job import JobResult


def load_job(job: Path, overrides: list[str] | None) -> JobConfig:
    from core.config import load_config
    from core.schema.job import JobConfig

    return load_config(JobConfig, job, overrides or [])


def print_result(result: JobResult) -> None:
    if not result.run_id:
        return  # a non-main process of a distributed job
    typer.echo(f"run:      {result.run_id} (experiment {result.experiment_id})")
    if result.version:
        typer.echo(f"version:  models:/{result.model_name}/{result.version}")
    uri = result.tracking_uri
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
    typer.echo(f"MLflow UI: {ui}  then open #/experiments/{result.experiment_id}/runs/{result.run_id}")


def train(
    job: JobArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the job's last run from its checkpoint.")] = False,
) -> None:
    """Fine-tune a base model with LoRA as the job file says; log the run to MLflow and register a version."""
    from tuneops.pipeline import train_and_evaluate

    cfg = load_job(job, overrides)
    result, verdict = train_and_evaluate(cfg, job.stem, resume=resume)
    print_result(result)
    if verdict is not None:
        typer.echo(verdict.summary())


def pipeline(
    job: JobArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the job's last run.")] = False,
) -> None:
    """Train, evaluate, gate, mark `candidate`, and promote when the job says `registry.promote: auto`."""
    from tuneops.pipeline import run_pipeline

    cfg = load_job(job, overrides)
    result = run_pipeline(cfg, job.stem, resume=resume)
    print_result(result.job)
    if result.verdict is not None:
        typer.echo(result.verdict.summary())
    state = "not promoted"
    if result.promoted:
        state = "promoted to production"
    elif result.candidate:
        state = "marked candidate"
    if result.job.version:
        typer.echo(f"{result.job.model_name}/{result.job.version}: {state}")
    if result.verdict is not None and not result.verdict.passed:
        raise typer.Exit(1)


def validate(job: JobArg, overrides: Overrides = None) -> None:
    """Print the resolved config and its hash; check the data and base model without training."""
    import yaml

    from core.config import config_hash, resolved_dict
    from finetune.job import check

    cfg = load_job(job, overrides)
    checked = check(cfg)
    typer.echo(yaml.safe_dump(resolved_dict(cfg), sort_keys=False).rstrip())
    typer.echo(f"# config hash: {config_hash(cfg)}")
    typer.echo(f"# base model: {checked.base.name} ({checked.base.digest})")
    typer.echo(f"# data: {checked.data.report.summary()}")


def data(
    job: JobArg,
    overrides: Overrides = None,
    show: Annotated[int, typer.Option(help="How many prepared examples to show.")] = 3,
) -> None:
    """Show prepared examples with the trained-on tokens in [[brackets]], and the data report."""
    from finetune.job import check
    from finetune.prepare import show as show_example

    cfg = load_job(job, overrides)
    checked = check(cfg)
    for tok in checked.data.train[:show]:
        typer.echo(f"--- {tok.source} ({len(tok.input_ids)} tokens)")
        typer.echo(show_example(checked.tokenizer, tok))
    typer.echo("--- report")
    typer.echo(json.dumps(checked.data.report.to_dict(), indent=2))


def models() -> None:
    """List the built-in base models."""
    from core.models import CATALOGUE, cache_dir

    for entry in CATALOGUE.values():
        cached = (cache_dir() / "models" / entry.name / "config.json").is_file()
        typer.echo(
            f"{entry.name}\t{entry.license}\t{'converted' if cached else 'not yet converted'}\t{entry.description}"
        )
