"""Alias policy on a real temporary MLflow registry: promotion, rollback, candidates and the ordered history."""

from __future__ import annotations

import json
import os
import pwd
import threading

import pytest

from core import aliases
from core.aliases import HISTORY_TAG, MoveKind, history, move_alias, promote, rollback
from core.errors import GateError, RegistryError
from core.registry import CANDIDATE, PRODUCTION, actor, connect, current_alias
from evaluate import verdict
from evaluate.gates import GateResult
from tuneops.cli import run as cli

NAME = "faq"
BOTH_BACKENDS = pytest.mark.parametrize("mlflow_store", ["sqlite", "postgres"], indirect=True)


def _versions(client, outcomes: list[bool | None], gates: bool = True) -> None:
    """Register one version per outcome and tag it as an evaluation would (None: never evaluated)."""
    client.create_registered_model(NAME)
    experiment = client.create_experiment("t")
    for i, outcome in enumerate(outcomes, start=1):
        run = client.create_run(experiment)
        client.create_model_version(NAME, f"{run.info.artifact_uri}/model-{i}", run_id=run.info.run_id)
        if outcome is None:
            continue
        results = [GateResult("rougeL >= 0.3", "rougeL", 0.25 if not outcome else 0.4, 0.3, None, None, outcome)]
        verdict.record(client, verdict.Verdict(NAME, str(i), outcome, results if gates else [], f"eval-run-{i}"))


@BOTH_BACKENDS
def test_promotion_needs_passing_gates_unless_forced_with_a_reason(mlflow_store, monkeypatch):
    monkeypatch.setenv("TUNEOPS_ACTOR", "alice")
    client = connect(mlflow_store)
    _versions(client, [True, False, None])

    with pytest.raises(GateError, match=r"faq/2: it failed its gates \(rougeL >= 0.3\) in evaluation run eval-run-2"):
        promote(client, NAME, "2")
    with pytest.raises(GateError, match="never evaluated"):
        promote(client, NAME, "3")
    with pytest.raises(GateError, match="--force needs --reason"):
        promote(client, NAME, "2", force=True)
    assert current_alias(client, NAME, PRODUCTION) is None  # nothing moved

    move = promote(client, NAME, "1")
    assert (move.version, move.previous, move.evaluation_run, move.kind) == ("1", None, "eval-run-1", "promote")
    assert "gates passed in evaluation run eval-run-1" in move.reason
    with pytest.raises(GateError, match="already production"):
        promote(client, NAME, "1")

    forced = promote(client, NAME, "2", force=True, reason="hotfix for the permit answers")
    assert forced.forced and forced.previous == "1"
    assert "forced past verdict 'fail'" in forced.reason and "hotfix for the permit answers" in forced.reason
    assert current_alias(client, NAME, PRODUCTION) == "2"

    moves = history(client, NAME)
    assert [(m.sequence, m.version, m.previous, m.kind, m.actor) for m in moves] == [
        (1, "1", None, MoveKind.PROMOTE, "alice"),
        (2, "2", "1", MoveKind.FORCED, "alice"),
    ]
    with pytest.raises(RegistryError, match="has no version 9"):
        promote(client, NAME, "9")


def test_rollback_walks_back_by_kind_not_by_reason_text(mlflow_store):
    client = connect(mlflow_store)
    _versions(client, [True, True, True])
    for v in ("1", "2", "3"):
        promote(client, NAME, v, reason="[rollback] looks like a rollback but is a promotion" if v == "3" else None)
    back = rollback(client, NAME, reason="bad answers")
    assert (back.kind, back.version, back.reason, back.evaluation_run) == (
        "rollback",
        "2",
        "from 3 to 2: bad answers",
        "eval-run-2",
    )
    assert rollback(client, NAME).version == "1"  # a second rollback goes further back, not to 3
    with pytest.raises(GateError, match="no earlier version"):
        rollback(client, NAME)
    assert current_alias(client, NAME, PRODUCTION) == "1"
    moves = history(client, NAME)
    assert [(m.version, m.kind) for m in moves] == [
        ("1", "promote"),
        ("2", "promote"),
        ("3", "promote"),
        ("2", "rollback"),
        ("1", "rollback"),
    ]
    with pytest.raises(RegistryError, match="no registered model named 'other'"):
        rollback(client, "other")


def test_history_written_before_kinds_existed_still_reads_and_rolls_back(mlflow_store):
    client = connect(mlflow_store)
    _versions(client, [True, True, True])
    old = [("1", None, "first", False), ("3", "1", "hotfix", True), ("1", "3", "[rollback] from 3 to 1", False)]
    for seq, (version, previous, reason, forced) in enumerate(old, start=1):
        record = {"alias": PRODUCTION, "version": version, "previous": previous, "actor": "bob", "reason": reason}
        record |= {"evaluation_run": None, "forced": forced, "at": 1_700_000_000.0 + seq}
        client.set_registered_model_tag(NAME, f"{HISTORY_TAG}{seq:06d}", json.dumps(record))
    client.set_registered_model_alias(NAME, PRODUCTION, "1")
    promote(client, NAME, "2")

    assert [(m.sequence, m.version, m.kind) for m in history(client, NAME)] == [
        (1, "1", "promote"),
        (2, "3", "forced"),
        (3, "1", "rollback"),
        (4, "2", "promote"),
    ]
    assert rollback(client, NAME).version == "1"


@BOTH_BACKENDS
def test_concurrent_moves_are_all_recorded_in_one_order_that_matches_the_alias(mlflow_store):
    client = connect(mlflow_store)
    _versions(client, [True, True])
    moves_each, start = 4, threading.Barrier(2)
    errors: list[BaseException] = []

    def mover(version: str) -> None:
        own = connect(mlflow_store)
        start.wait()
        try:
            for i in range(moves_each):
                move_alias(own, NAME, PRODUCTION, version, f"thread {version} move {i}")
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(v,)) for v in ("1", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors

    moves = history(client, NAME)
    assert sorted(m.reason for m in moves) == sorted(f"thread {v} move {i}" for v in "12" for i in range(moves_each))
    assert [m.sequence for m in moves] == list(range(1, 2 * moves_each + 1))
    assert [m.at for m in moves] == sorted(m.at for m in moves)
    assert current_alias(client, NAME, PRODUCTION) == moves[-1].version  # the newest record is what is live


def test_a_failed_move_leaves_no_record(mlflow_store, monkeypatch):
    client = connect(mlflow_store)
    _versions(client, [True])

    def refuse(*args, **kwargs):
        raise RuntimeError("store went away")

    monkeypatch.setattr(client, "set_registered_model_alias", refuse)
    with pytest.raises(RuntimeError, match="store went away"):
        promote(client, NAME, "1")
    assert history(client, NAME) == []


def test_an_evaluation_without_gates_is_no_pass(mlflow_store):
    client = connect(mlflow_store)
    _versions(client, [True, False], gates=False)
    assert aliases.read_verdict(client, NAME, "1").verdict == "no gates"
    with pytest.raises(GateError, match="had no gates"):
        promote(client, NAME, "1")
    assert aliases.candidate(client, NAME, "1", "evaluated").kind == "candidate"
    assert current_alias(client, NAME, CANDIDATE) == "1"
    assert promote(client, NAME, "1", force=True, reason="reviewed by hand").kind == "forced"


def test_actor_is_the_login_user_when_the_environment_names_none(monkeypatch):
    for var in ("TUNEOPS_ACTOR", "USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    assert actor() == pwd.getpwuid(os.getuid()).pw_name != "unknown"
    monkeypatch.setenv("TUNEOPS_ACTOR", "ci-bot")
    assert actor() == "ci-bot"


@BOTH_BACKENDS
def test_cli_promote_rollback_history_and_bad_input(mlflow_store, capsys):
    client = connect(mlflow_store)
    _versions(client, [True, False])

    assert cli(["promote", NAME, "2"]) == 2
    err = capsys.readouterr().err
    assert "refusing to promote faq/2" in err and "rougeL >= 0.3" in err
    assert current_alias(client, NAME, PRODUCTION) is None

    assert cli(["rollback", NAME]) == 2
    assert "no production version" in capsys.readouterr().err

    assert cli(["promote", NAME, "1"]) == 0
    assert cli(["promote", NAME, "2", "--force", "--reason", "customer demo"]) == 0
    assert "[forced]" in capsys.readouterr().out
    assert cli(["rollback", NAME]) == 0
    assert current_alias(client, NAME, PRODUCTION) == "1"

    capsys.readouterr()
    assert cli(["history", NAME]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "promote" in lines[0] and "- -> 1" in lines[0] and "eval-run-1 (verdict pass)" in lines[0]
    assert "forced" in lines[1] and "1 -> 2" in lines[1] and "customer demo" in lines[1] and "verdict fail" in lines[1]
    assert "rollback" in lines[2] and "2 -> 1" in lines[2]

    assert cli(["history", "nope"]) == 2
    assert "no registered model named 'nope'" in capsys.readouterr().err


def test_cli_evaluate_bad_input_exits_2_without_moving_aliases(mlflow_store, capsys, tmp_path):
    client = connect(mlflow_store)
    _versions(client, [True])
    promote(client, NAME, "1")
    cases = [
        (["evaluate", "nope"], "no registered model named 'nope'"),
        (["evaluate", f"{NAME}@staging"], "has no alias 'staging'"),
        (["evaluate", NAME, "--gate", "bleu >= 0.2"], "unknown metric 'bleu'; known metrics: loss"),
        (["evaluate", NAME, "--suite", "vibes"], "suites.0"),
    ]
    empty = tmp_path / "empty.csv"
    empty.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n")
    cases.append((["evaluate", NAME, "--suite", "crows", "--crows", str(empty)], "suite is empty"))
    broken = tmp_path / "cf.jsonl"
    broken.write_text('{"id": 1, "axis": "age", "template": "hi {group}", "groups": ["a", "b"]}\n{"id": 2}\n')
    cases.append((["evaluate", NAME, "--suite", "counterfactual", "--counterfactual", str(broken)], "cf.jsonl:2:"))
    for argv, message in cases:
        assert cli(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert current_alias(client, NAME, PRODUCTION) == "1"
    assert [m.version for m in history(client, NAME)] == ["1"]
