"""`tuneops promote | rollback | history`: moving `production` and reading back every alias move."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneops.commands.options import TrackingOpt

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why; recorded in the alias history.")]


def promote(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="Version number to make production.")],
    force: Annotated[bool, typer.Option("--force", help="Promote even though gates failed (needs --reason).")] = False,
    reason: ReasonOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point `production` at VERSION, only if its gates passed (or --force --reason)."""
    from core import aliases
    from core.registry import connect

    move = aliases.promote(connect(tracking_uri), name, version, force=force, reason=reason)
    was = f" (was {move.previous})" if move.previous else ""
    typer.echo(f"{name}@production -> {move.version}{was}{' [forced]' if move.forced else ''}: {move.reason}")


def rollback(name: NameArg, reason: ReasonOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Move `production` back to the version it pointed at before."""
    from core import aliases
    from core.registry import connect

    move = aliases.rollback(connect(tracking_uri), name, reason=reason)
    typer.echo(f"{name}@production -> {move.version} (was {move.previous}): {move.reason}")


def history(name: NameArg, tracking_uri: TrackingOpt = None) -> None:
    """Every alias move, oldest first: kind, alias, from and to, who, why, and the evaluation behind it."""
    from core import aliases
    from core.registry import connect

    client = connect(tracking_uri)
    moves = aliases.history(client, name)
    if not moves:
        typer.echo(f"{name}: no alias moves yet")
        return
    for move in moves:
        verdict = aliases.read_verdict(client, name, move.version).verdict if move.version else None
        typer.echo(
            f"{move.sequence:>3}  {move.when()}  {move.kind:<9} {move.alias:<10} {move.previous or '-'} -> "
            f"{move.version or '-'}  by {move.actor}  why: {move.reason}  evaluation: {move.evaluation_run or '-'}"
            f" (verdict {verdict or 'none'})"
        )
