"""Promotion, rollback and history on a real temporary MLflow registry, through the API and the CLI."""

from __future__ import annotations

import pytest

from core.errors import GateError, RegistryError
from core.registry import PRODUCTION, connect, current_alias
from evaluate import verdict
from evaluate.gates import GateResult
from evaluate.promotion import history, promote, rollback
from tuneops.cli import run as cli

NAME = "faq"


def _versions(client, outcomes: list[bool | None]) -> None:
    """Register one version per outcome and tag it as an evaluation would (None: never evaluated)."""
    client.create_registered_model(NAME)
    experiment = client.create_experiment("t")
    for i, outcome in enumerate(outcomes, start=1):
        run = client.create_run(experiment)
        client.create_model_version(NAME, f"file:///nowhere/{i}", run_id=run.info.run_id)
        if outcome is None:
            continue
        gates = [GateResult("rougeL >= 0.3", "rougeL", 0.25 if not outcome else 0.4, 0.3, None, None, outcome)]
        verdict.record(client, verdict.Verdict(NAME, str(i), outcome, gates, f"eval-run-{i}"))


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
    assert (move.version, move.previous, move.evaluation_run, move.forced) == ("1", None, "eval-run-1", False)
    assert "gates passed in evaluation run eval-run-1" in move.reason
    with pytest.raises(GateError, match="already production"):
        promote(client, NAME, "1")

    forced = promote(client, NAME, "2", force=True, reason="hotfix for the permit answers")
    assert forced.forced and forced.previous == "1"
    assert "forced past verdict 'fail'" in forced.reason and "hotfix for the permit answers" in forced.reason
    assert current_alias(client, NAME, PRODUCTION) == "2"

    moves = history(client, NAME)
    assert [(m.version, m.previous, m.forced, m.actor) for m in moves] == [
        ("1", None, False, "alice"),
        ("2", "1", True, "alice"),
    ]
    with pytest.raises(RegistryError, match="has no version 9"):
        promote(client, NAME, "9")


def test_rollback_walks_back_through_promotions(mlflow_store):
    client = connect(mlflow_store)
    _versions(client, [True, True, True])
    for v in ("1", "2", "3"):
        promote(client, NAME, v)
    assert rollback(client, NAME, reason="bad answers").version == "2"
    assert current_alias(client, NAME, PRODUCTION) == "2"
    assert rollback(client, NAME).version == "1"  # a second rollback goes further back, not to 3
    with pytest.raises(GateError, match="no earlier version"):
        rollback(client, NAME)
    assert current_alias(client, NAME, PRODUCTION) == "1"
    moves = history(client, NAME)
    assert [m.version for m in moves] == ["1", "2", "3", "2", "1"]
    assert moves[3].reason == "[rollback] from 3 to 2: bad answers"
    assert moves[3].evaluation_run == "eval-run-2"
    with pytest.raises(RegistryError, match="no registered model named 'other'"):
        rollback(client, "other")


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
    assert "- -> 1" in lines[0] and "eval-run-1 (verdict pass)" in lines[0]
    assert "1 -> 2" in lines[1] and "FORCED" in lines[1] and "customer demo" in lines[1] and "verdict fail" in lines[1]
    assert "2 -> 1" in lines[2] and "[rollback]" in lines[2]

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
