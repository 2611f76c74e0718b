"""Alias policy: how `candidate` and `production` move, and the ordered history of every move.

Promotion trusts only the verdict tags an evaluation left on the version, so the registry alone says whether a
version may go to production: a failing, ungated or never-evaluated version is refused unless forced with a
reason, and the move is recorded as forced. Every move is a typed record (promote, rollback, candidate,
forced) stored as a registered-model tag; rollback replays those records as a stack (promotions push,
rollbacks pop), so repeated rollbacks walk further back instead of bouncing between two versions.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from core.errors import GateError, RegistryError
from core.registry import CANDIDATE, PRODUCTION, actor, current_alias

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

HISTORY_TAG = "tuneops.alias_history."
VERDICT_TAG = "tuneops.verdict"
EVALUATION_RUN_TAG = "tuneops.evaluation_run"
GATES_FAILED_TAG = "tuneops.gates_failed"
GATES_TAG = "tuneops.gates"
EVALUATED_AT_TAG = "tuneops.evaluated_at"
PASS, FAIL, NO_GATES = "pass", "fail", "no gates"
LEGACY_ROLLBACK_MARK = "[rollback] "  # how records written before `kind` existed marked a rollback
SETTLE_ROUNDS = 5


class MoveKind(StrEnum):
    """Why an alias moved: a gated promotion, a rollback, a new candidate, or a move past the gates."""

    PROMOTE = "promote"
    ROLLBACK = "rollback"
    CANDIDATE = "candidate"
    FORCED = "forced"


@dataclass(frozen=True)
class AliasMove:
    """One recorded alias move; `sequence` is its place (from 1) in the model's history, oldest first."""

    kind: MoveKind
    alias: str
    version: str | None
    previous: str | None
    actor: str
    reason: str
    evaluation_run: str | None
    at: float
    sequence: int = 0

    @property
    def forced(self) -> bool:
        return self.kind is MoveKind.FORCED

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))


@dataclass(frozen=True)
class StoredVerdict:
    """A verdict as read back from a version's tags: `verdict` is None when it was never evaluated."""

    verdict: str | None
    evaluation_run: str | None
    gates_failed: list[str]


def read_verdict(client: MlflowClient, name: str, version: str) -> StoredVerdict:
    """The verdict tags the latest evaluation left on a version."""
    tags = client.get_model_version(name, version).tags
    failed = [g for g in (tags.get(GATES_FAILED_TAG) or "").split("; ") if g]
    return StoredVerdict(tags.get(VERDICT_TAG), tags.get(EVALUATION_RUN_TAG), failed)


def _order(key: str, data: dict[str, Any]) -> tuple[int, str]:
    """New keys carry their nanosecond time; old keys (a counter) are ordered by their `at`."""
    stamp, sep, _ = key[len(HISTORY_TAG) :].partition("-")
    return (int(stamp) if sep else round(float(data["at"]) * 1e9), key)


def _legacy_kind(data: dict[str, Any]) -> MoveKind:
    """Records written before `kind` existed: forced flag, rollback reason prefix, or the alias moved."""
    if data.get("forced"):
        return MoveKind.FORCED
    if str(data.get("reason", "")).startswith(LEGACY_ROLLBACK_MARK):
        return MoveKind.ROLLBACK
    return MoveKind.CANDIDATE if data.get("alias") == CANDIDATE else MoveKind.PROMOTE


def _records(client: MlflowClient, name: str) -> list[tuple[str, AliasMove]]:
    """Every history record of a model with its tag key, oldest first and numbered."""
    tags = client.get_registered_model(name).tags
    parsed = [(k, json.loads(v)) for k, v in tags.items() if k.startswith(HISTORY_TAG)]
    parsed.sort(key=lambda kv: _order(*kv))
    out = []
    for seq, (key, data) in enumerate(parsed, start=1):
        kind = MoveKind(data["kind"]) if "kind" in data else _legacy_kind(data)
        move = AliasMove(
            kind=kind,
            alias=data["alias"],
            version=data.get("version"),
            previous=data.get("previous"),
            actor=data.get("actor", "unknown"),
            reason=data.get("reason", ""),
            evaluation_run=data.get("evaluation_run"),
            at=float(data["at"]),
            sequence=seq,
        )
        out.append((key, move))
    return out


def _check_model(client: MlflowClient, name: str, version: str | None = None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named '{name}'") from None
    if version is None:
        return
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"model '{name}' has no version {version}") from None


def history(client: MlflowClient, name: str) -> list[AliasMove]:
    """Every alias move of a model, oldest first: kind, who, when, why, and the evaluation behind it."""
    _check_model(client, name)
    return [move for _, move in _records(client, name)]


def _point(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    from mlflow.exceptions import MlflowException

    for attempt in range(5):
        try:
            if version is not None:
                client.set_registered_model_alias(name, alias, version)
            elif current_alias(client, name, alias) is not None:
                client.delete_registered_model_alias(name, alias)
            return
        except MlflowException as exc:
            # MLflow's SQL store checks for the alias row and then inserts it: two movers at once can both
            # insert, and the second hits the unique key. The row exists by then, so trying again updates it.
            conflict = any(word in str(exc) for word in ("UNIQUE constraint", "IntegrityError", "duplicate key"))
            if not conflict or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def _settle(client: MlflowClient, name: str, alias: str) -> list[tuple[str, AliasMove]]:
    """Point the alias where its newest record says, so racing moves end where the history says they do.

    Every mover settles after its own move and all agree on the newest record, so they converge on it.
    """
    from mlflow.exceptions import MlflowException

    records = _records(client, name)
    for _ in range(SETTLE_ROUNDS):
        newest = next((m for _, m in reversed(records) if m.alias == alias), None)
        target = newest.version if newest else None
        if current_alias(client, name, alias) == target:
            break
        try:
            _point(client, name, alias, target)
        except MlflowException as exc:  # e.g. a racing move that failed is deleting its record right now
            log.warning("settling %s@%s on version %s failed: %s", name, alias, target, exc)
        records = _records(client, name)
    return records


def move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str | None,
    reason: str,
    evaluation_run: str | None = None,
    kind: MoveKind = MoveKind.FORCED,
) -> AliasMove:
    """Point an alias at a version (None removes it) and record the move; no verdict is checked here.

    The record is written first, under a key of its nanosecond time and a random suffix: concurrent moves
    never overwrite each other's records, and the history has one order. Then the alias moves; if that fails
    the record is deleted, so the history never shows a move that did not happen. `kind` defaults to forced:
    a move that skipped the gates says so.
    """
    _check_model(client, name, version)
    previous = current_alias(client, name, alias)
    at, who = time.time_ns(), actor()
    key = f"{HISTORY_TAG}{at:020d}-{secrets.token_hex(4)}"
    record = {
        "kind": str(kind),
        "alias": alias,
        "version": version,
        "previous": previous,
        "actor": who,
        "reason": reason,
        "evaluation_run": evaluation_run,
        "at": at / 1e9,
    }
    client.set_registered_model_tag(name, key, json.dumps(record))
    try:
        _point(client, name, alias, version)
    except BaseException:
        client.delete_registered_model_tag(name, key)
        raise
    records = _settle(client, name, alias)
    if version is not None:
        client.set_model_version_tag(name, version, f"tuneops.{alias}.moved_by", who)
        client.set_model_version_tag(name, version, f"tuneops.{alias}.reason", reason[:4000])
    sequence = next((m.sequence for k, m in records if k == key), 0)
    return AliasMove(kind, alias, version, previous, who, reason, evaluation_run, at / 1e9, sequence)


def candidate(client: MlflowClient, name: str, version: str, reason: str) -> AliasMove:
    """Mark an evaluated version that failed no gate as `candidate`, the next in line for production."""
    version = str(version)
    _check_model(client, name, version)
    stored = read_verdict(client, name, version)
    if stored.verdict not in (PASS, NO_GATES):
        raise GateError(f"{name}/{version} cannot be a candidate: {_problem(stored)}")
    return move_alias(client, name, CANDIDATE, version, reason, stored.evaluation_run, MoveKind.CANDIDATE)


def _problem(stored: StoredVerdict) -> str:
    if stored.verdict is None:
        return "it was never evaluated (run `tuneops evaluate` first)"
    if stored.verdict == NO_GATES:
        return f"evaluation run {stored.evaluation_run} had no gates, so nothing says it is good enough"
    failing = "; ".join(stored.gates_failed) or "see the evaluation run"
    return f"it failed its gates ({failing}) in evaluation run {stored.evaluation_run}"


def promote(client: MlflowClient, name: str, version: str, force: bool = False, reason: str | None = None) -> AliasMove:
    """Point `production` at a version whose gates passed; `force` (with a reason) overrides, recorded as forced."""
    version = str(version)
    _check_model(client, name, version)
    stored = read_verdict(client, name, version)
    if force and not (reason and reason.strip()):
        raise GateError("--force needs --reason: say why the gates are overridden (it is recorded)")
    if stored.verdict != PASS and not force:
        raise GateError(f"refusing to promote {name}/{version}: {_problem(stored)}; override with --force --reason")
    if current_alias(client, name, PRODUCTION) == version:
        raise GateError(f"{name}/{version} is already production")
    why = reason.strip() if reason else f"gates passed in evaluation run {stored.evaluation_run}"
    if force and stored.verdict != PASS:
        why = f"forced past verdict '{stored.verdict or 'never evaluated'}': {why}"
    kind = MoveKind.FORCED if force else MoveKind.PROMOTE
    return move_alias(client, name, PRODUCTION, version, why, stored.evaluation_run, kind)


def production_stack(moves: list[AliasMove]) -> list[str]:
    """The versions rollback can return to, newest last: promotions (forced too) push, rollbacks pop."""
    stack: list[str] = []
    for move in moves:
        if move.alias != PRODUCTION:
            continue
        if move.kind is MoveKind.ROLLBACK:
            if stack:
                stack.pop()
        elif move.version is not None:
            stack.append(move.version)
    return stack


def rollback(client: MlflowClient, name: str, reason: str | None = None) -> AliasMove:
    """Move `production` back to the version it pointed at before the current one."""
    _check_model(client, name)
    current = current_alias(client, name, PRODUCTION)
    if current is None:
        raise GateError(f"model '{name}' has no production version to roll back")
    stack = production_stack(history(client, name))
    if len(stack) < 2 or stack[-1] != current:
        raise GateError(f"{name}: production ({current}) has no earlier version to roll back to")
    target = stack[-2]
    stored = read_verdict(client, name, target)
    why = f"from {current} to {target}" + (f": {reason.strip()}" if reason and reason.strip() else "")
    return move_alias(client, name, PRODUCTION, target, why, stored.evaluation_run, MoveKind.ROLLBACK)
