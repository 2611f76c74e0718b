"""`tuneops stack up | down | status`: the team's PostgreSQL-backed MLflow server on this machine."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Action(StrEnum):
    UP = "up"
    DOWN = "down"
    STATUS = "status"


def stack(
    action: Annotated[Action, typer.Argument(help="up: start (harmless twice); down: stop, keep data; status.")],
    folder: Annotated[Path, typer.Option(help="Where the database, artifacts, logs and pids live.")] = Path(".stack"),
    host: Annotated[str, typer.Option(help="Address the MLflow server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    pg_port: Annotated[int, typer.Option(help="PostgreSQL port (loopback only).")] = 5433,
    workers: Annotated[int, typer.Option(min=1, help="MLflow server worker processes.")] = 2,
    auth: Annotated[
        bool,
        typer.Option("--auth", help="Require MLflow basic auth (user 'admin', password in FOLDER/admin-password)."),
    ] = False,
) -> None:
    """Run a shared MLflow server on PostgreSQL, serving artifacts over HTTP, for a team on one machine."""
    from tuneops.stack import ADMIN_USER, Stack

    s = Stack(folder, host=host, port=port, pg_port=pg_port, workers=workers)
    if action is Action.UP:
        s.up(auth=auth)
        typer.echo(f"MLflow server on PostgreSQL is up ({folder}/mlflow-server.log). Use it with:")
        typer.echo(f"export MLFLOW_TRACKING_URI={s.tracking_uri}")
        if auth:
            typer.echo(f"export MLFLOW_TRACKING_USERNAME={ADMIN_USER}")
            typer.echo(f"export MLFLOW_TRACKING_PASSWORD=$(cat {folder}/admin-password)")
    elif action is Action.DOWN:
        stopped = s.down()
        typer.echo(f"stopped {' and '.join(stopped)}; data kept in {folder}" if stopped else "nothing was running")
    else:
        for part, up in s.status().items():
            typer.echo(f"{part}: {'running' if up else 'stopped'}")
