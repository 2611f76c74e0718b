"""The `tuneops` command line. Each command reads its config, validates everything, then runs one job.

TuneopsError (bad config, data, model or registry reference) ends with its message and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.errors import TuneopsError

app = typer.Typer(
    help="Fine-tune, evaluate, gate, register and serve foundation models.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JobArg = Annotated[Path, typer.Argument(help="Job file (YAML).", exists=False)]
Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides such as training.learning_rate=1e-4.")]


def load_job(job: Path, overrides: list[str] | None):  # type: ignore[no-untyped-def]
    from core.config import load_config
    from core.schema.job import JobConfig

    return load_config(JobConfig, job, overrides or [])


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
def models() -> None:
    """List the built-in base models."""
    from core.models import CATALOGUE, cache_dir

    for entry in CATALOGUE.values():
        cached = (cache_dir() / "models" / entry.name / "config.json").is_file()
        typer.echo(
            f"{entry.name}\t{entry.license}\t{'converted' if cached else 'not yet converted'}\t{entry.description}"
        )


def print_result(result) -> None:  # type: ignore[no-untyped-def]
    if not result.run_id:
        return  # a non-main process of a distributed job
    typer.echo(f"run:      {result.run_id} (experiment {result.experiment_id})")
    if result.version:
        typer.echo(f"version:  models:/{result.model_name}/{result.version}")
    uri = result.tracking_uri
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
    typer.echo(f"MLflow UI: {ui}  then open #/experiments/{result.experiment_id}/runs/{result.run_id}")


def _register_stage_commands() -> None:
    """Add the evaluate, serve and pipeline commands, each defined beside its stage's glue."""
    from tuneops import cli_evaluate, cli_serve, pipeline

    if getattr(app, "_stages_registered", False):
        return
    for module in (cli_evaluate, cli_serve, pipeline):
        module.register(app)
    app._stages_registered = True  # type: ignore[attr-defined]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; the one place where errors become exit statuses."""
    logging.basicConfig(level=os.environ.get("TUNEOPS_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    _register_stage_commands()
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns a command's Exit code in this mode
    except TuneopsError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # click usage errors carry their own exit status
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return rc if isinstance(rc, int) else 0


def main() -> None:
    sys.exit(run())
