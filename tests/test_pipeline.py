"""`tuneops pipeline`: train -> evaluate -> gate -> candidate -> promote, on the tiny model."""

import logging
from pathlib import Path

import pytest
import yaml

from core.aliases import history
from core.registry import CANDIDATE, PRODUCTION, connect, current_alias
from tuneops.cli import run


def write_job(tmp_path: Path, tiny_base: Path, gates: list[str], promote: str = "auto", uri: str | None = None) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(tiny_base)},
                "data": {"path": "builtin:zaragoza-faq", "max_examples": 30, "max_length": 256},
                "lora": {"r": 4, "alpha": 8},
                "training": {
                    "output_dir": str(tmp_path / "out"),
                    "max_steps": 2,
                    "batch_size": 4,
                    "eval_steps": 2,
                },
                "tracking": {"tracking_uri": uri or f"sqlite:///{tmp_path}/mlflow.db"},
                "registry": {"model_name": "pipe", "promote": promote},
                "evaluation": {
                    "suites": ["quality"],
                    "max_examples": 3,
                    "max_new_tokens": 4,
                    "gates": gates,
                    "bootstrap_samples": 100,
                },
            }
        )
    )
    return path


@pytest.mark.parametrize("mlflow_store", ["sqlite", "postgres"], indirect=True)
def test_passing_gates_make_a_candidate_and_auto_promote(mlflow_store, tmp_path, tiny_base, capsys, caplog):
    caplog.set_level(logging.INFO)
    job = write_job(tmp_path, tiny_base, ["perplexity <= 2 * base"], uri=mlflow_store)
    assert run(["pipeline", str(job)]) == 0
    client = connect(mlflow_store)
    assert current_alias(client, "pipe", CANDIDATE) == "1"
    assert current_alias(client, "pipe", PRODUCTION) == "1"
    captured = capsys.readouterr()
    assert "pipe/1: promoted to production" in captured.out and "PASS" in captured.out
    printed = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    assert printed.count("perplexity <= 2 * base: value") == 1  # the gate table once
    assert [m.kind for m in history(client, "pipe")] == ["candidate", "promote"]


def test_no_gates_make_a_candidate_but_never_an_automatic_promotion(tmp_path, tiny_base, capsys):
    assert run(["pipeline", str(write_job(tmp_path, tiny_base, [], promote="auto"))]) == 0
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    assert current_alias(client, "pipe", CANDIDATE) == "1"
    assert current_alias(client, "pipe", PRODUCTION) is None
    out = capsys.readouterr().out
    assert "pipe/1: NO GATES" in out and "pipe/1: marked candidate" in out


def test_failing_gates_move_no_alias_and_exit_1(tmp_path, tiny_base, capsys):
    assert run(["pipeline", str(write_job(tmp_path, tiny_base, ["rougeL >= 0.99"]))]) == 1
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    assert current_alias(client, "pipe", CANDIDATE) is None
    assert current_alias(client, "pipe", PRODUCTION) is None
    assert "FAIL" in capsys.readouterr().out


def test_manual_promotion_stops_at_candidate(tmp_path, tiny_base):
    assert run(["pipeline", str(write_job(tmp_path, tiny_base, [], promote="manual"))]) == 0
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    assert current_alias(client, "pipe", CANDIDATE) == "1"
    assert current_alias(client, "pipe", PRODUCTION) is None


def test_unknown_gate_metric_fails_before_training(tmp_path, tiny_base, capsys):
    assert run(["pipeline", str(write_job(tmp_path, tiny_base, ["bleu >= 0.1"]))]) == 2
    assert "unknown metric 'bleu'" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("tuneops-run.json"))
