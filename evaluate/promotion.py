"""Promote, roll back and list the history of the `production` alias.

Promotion trusts only the verdict tags an evaluation left on the version: a failing or never-evaluated
version is refused unless forced with a reason, and a forced move is recorded as forced. Rollback replays
the alias history as a stack (promotions push, rollbacks pop), so repeated rollbacks walk further back
instead of bouncing between two versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.errors import GateError, RegistryError
from core.registry import PRODUCTION, AliasMove, alias_history, current_alias, move_alias
from evaluate import verdict

if TYPE_CHECKING:
    from mlflow import MlflowClient

ROLLBACK_MARK = "[rollback] "


def _check_version(client: MlflowClient, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named '{name}'") from None
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model '{name}' has no version {version}") from None


def promote(client: MlflowClient, name: str, version: str, force: bool = False, reason: str | None = None) -> AliasMove:
    """Point `production` at a version whose gates passed; `force` (with a reason) overrides, recorded."""
    version = str(version)
    _check_version(client, name, version)
    stored = verdict.read(client, name, version)
    if force and not (reason and reason.strip()):
        raise GateError("--force needs --reason: say why the gates are overridden (it is recorded)")
    if stored.verdict != "pass" and not force:
        if stored.verdict is None:
            problem = "was never evaluated (run `tuneops evaluate` first)"
        else:
            failing = "; ".join(stored.gates_failed) or "see the evaluation run"
            problem = f"failed its gates ({failing}) in evaluation run {stored.evaluation_run}"
        raise GateError(f"refusing to promote {name}/{version}: it {problem}; override with --force --reason")
    if current_alias(client, name, PRODUCTION) == version:
        raise GateError(f"{name}/{version} is already production")
    why = reason.strip() if reason else f"gates passed in evaluation run {stored.evaluation_run}"
    if force and stored.verdict != "pass":
        why = f"forced past verdict '{stored.verdict or 'never evaluated'}': {why}"
    return move_alias(client, name, PRODUCTION, version, why, stored.evaluation_run, forced=force)


def _production_stack(moves: list[AliasMove]) -> list[str]:
    stack: list[str] = []
    for move in moves:
        if move.alias != PRODUCTION:
            continue
        if move.reason.startswith(ROLLBACK_MARK):
            if stack:
                stack.pop()
        elif move.version is not None:
            stack.append(move.version)
    return stack


def rollback(client: MlflowClient, name: str, reason: str | None = None) -> AliasMove:
    """Move `production` back to the version it pointed at before the current one."""
    _check_registered(client, name)
    current = current_alias(client, name, PRODUCTION)
    if current is None:
        raise GateError(f"model '{name}' has no production version to roll back")
    stack = _production_stack(alias_history(client, name))
    if len(stack) < 2 or stack[-1] != current:
        raise GateError(f"{name}: production ({current}) has no earlier version to roll back to")
    target = stack[-2]
    stored = verdict.read(client, name, target)
    why = f"{ROLLBACK_MARK}from {current} to {target}" + (f": {reason.strip()}" if reason else "")
    return move_alias(client, name, PRODUCTION, target, why, stored.evaluation_run)


def _check_registered(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named '{name}'") from None


def history(client: MlflowClient, name: str) -> list[AliasMove]:
    """Every alias move of a model, oldest first: who, when, why, forced, and the evaluation behind it."""
    _check_registered(client, name)
    return alias_history(client, name)
