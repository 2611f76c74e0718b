"""The CLI: commands work, and every bad input exits 2 with a clear message and leaves no run behind."""

import json
from pathlib import Path

import pytest
import yaml

from tuneops.cli import run

COMMANDS = (
    *("train", "pipeline", "sweep", "validate", "data", "models"),
    *("evaluate", "promote", "rollback", "history", "serve", "serve-key-hash", "predict", "stack"),
    *("monitor", "retrain"),
)


def write_job(tmp_path: Path, tiny_base: Path, **sections) -> Path:
    data = {
        "model": {"base": str(tiny_base)},
        "data": {"path": "builtin:zaragoza-faq", "max_examples": 20, "max_length": 256},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 4},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def no_run_was_made(tmp_path: Path) -> bool:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return True
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


def test_models_lists_the_embedded_default(capsys):
    assert run(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_validate_prints_resolved_config_and_hash(tmp_path, tiny_base, capsys):
    assert run(["validate", str(write_job(tmp_path, tiny_base)), "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "# config hash: " in out and "kept 20" in out
    assert no_run_was_made(tmp_path)


def test_data_shows_trained_tokens_and_report(tmp_path, tiny_base, capsys):
    assert run(["data", str(write_job(tmp_path, tiny_base)), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[" in out and '"rows_read": 503' in out


def test_help_on_every_command(capsys):
    for cmd in COMMANDS:
        assert run([cmd, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


QA = json.dumps({"instruction": "Q?", "output": "A."})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("misspelt_key", "training.learnig_rate (command line): unknown key; did you mean 'learning_rate'?"),
        ("wrong_type", "training.batch_size (command line): Input should be a valid integer"),
        ("out_of_range", "lora.dropout (command line): Input should be less than 1"),
        ("missing_data", "does not exist"),
        ("empty_data", "holds no rows"),
        ("malformed_jsonl", "bad.jsonl:2: invalid JSON"),
        ("csv_columns", "CSV has no column(s) ['instruction', 'output']"),
        ("all_too_long", "all 503 examples are longer than data.max_length=16"),
        ("unknown_base", "model.base 'no-such-model' is not a catalogue model"),
        ("hub_offline", "model.base 'someorg/somemodel' is a hub id that is not in the local cache"),
        ("unwritable_output", "training.output_dir"),
        ("unreachable_tracking", "tracking server http://127.0.0.1:9 is unreachable"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_no_run(tmp_path, tiny_base, capsys, monkeypatch, case, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = write_job(tmp_path, tiny_base)
    overrides = {
        "misspelt_key": ["training.learnig_rate=0.1"],
        "wrong_type": ["training.batch_size=many"],
        "out_of_range": ["lora.dropout=3"],
        "missing_data": [f"data.path={tmp_path}/nope.jsonl"],
        "empty_data": [f"data.path={jsonl(tmp_path / 'empty.jsonl', [])}"],
        "malformed_jsonl": [f"data.path={jsonl(tmp_path / 'bad.jsonl', [QA, '{broken', QA])}"],
        "csv_columns": [
            f"data.path={jsonl(tmp_path / 'd.csv', ['question,answer', 'q,a'])}",
            "data.shape=instruction",
        ],
        "all_too_long": ["data.max_length=16"],
        "unknown_base": ["model.base=no-such-model"],
        "hub_offline": ["model.base=someorg/somemodel"],
        "unwritable_output": [f"training.output_dir={jsonl(tmp_path / 'a-file', ['x'])}/sub"],
        "unreachable_tracking": ["tracking.tracking_uri=http://127.0.0.1:9"],
    }[case]
    assert run(["train", str(job), *overrides]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err
    assert no_run_was_made(tmp_path)


def test_the_app_is_complete_at_import():
    from typer.testing import CliRunner

    from tuneops.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)


def test_serve_takes_configs_serve_yaml_by_default_and_model_names_as_arguments(tmp_path, monkeypatch):
    import serve.server

    served = []
    monkeypatch.setattr(serve.server, "serve", served.append)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "serve.yaml").write_text("models: [faq-assistant]\nport: 8123\n")

    assert run(["serve"]) == 0
    assert run(["serve", "faq-assistant", "other-model", "--port", "9000"]) == 0
    assert [(s.models, s.port) for s in served] == [(["faq-assistant"], 8123), (["faq-assistant", "other-model"], 9000)]
