"""The `tuneops` command line, complete at import: every command is listed once in COMMANDS.

Each command reads its config, validates everything, then runs one job. A TuneopsError (bad config, data,
model or registry reference) ends with its message and exit status 2, however the app is invoked.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

from core.errors import TuneopsError
from tuneops.commands import aliases, evaluation, jobs, monitoring, predict, serving, stack, sweep

COMMANDS: dict[str, Callable[..., None]] = {
    "train": jobs.train,
    "pipeline": jobs.pipeline,
    "sweep": sweep.sweep,
    "validate": jobs.validate,
    "data": jobs.data,
    "models": jobs.models,
    "evaluate": evaluation.evaluate,
    "promote": aliases.promote,
    "rollback": aliases.rollback,
    "history": aliases.history,
    "serve": serving.serve,
    "serve-key-hash": serving.serve_key_hash,
    "predict": predict.predict,
    "stack": stack.stack,
    "monitor": monitoring.monitor,
    "retrain": monitoring.retrain,
}


class _Commands(TyperGroup):
    """The one place errors become exit statuses, for `run()` and for click's test runner alike.

    A TuneopsError prints its message and exits 2; Ctrl-C exits 130; click's own usage errors keep theirs.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # the order of COMMANDS, not alphabetical

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TuneopsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("aborted", err=True)
            raise typer.Exit(130) from None


def build_app() -> typer.Typer:
    app = typer.Typer(
        cls=_Commands,
        help="Fine-tune, evaluate, gate, register and serve foundation models.",
        no_args_is_help=True,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    for name, command in COMMANDS.items():
        app.command(name)(command)
    return app


app = build_app()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    logging.basicConfig(level=os.environ.get("TUNEOPS_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, prog_name="tuneops")  # standalone: click reports usage errors and always exits
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def main() -> None:
    sys.exit(run())
