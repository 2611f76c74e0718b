"""`tuneops predict`: answers equal the gateway's at temperature 0, resume keeps answered rows, a run is logged."""

from __future__ import annotations

import hashlib
import json

import mlflow
import pytest
from test_serve_support import running_gateway

from tuneops.cli import run as cli

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "Do I need a permit for a carport?"}]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]},
    {"id": "c", "prompt": "The building permit"},
    {"id": "d", "messages": [{"role": "user", "content": "How long does a roof repair take?"}]},
    {"id": "e", "messages": [{"role": "user", "content": "Hi"}]},
]
ARGS = ["--max-tokens", "10", "--dtype", "fp32", "--batch-size", "3", "--no-progress"]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_matches_the_gateway_resumes_and_logs_a_run(make_version, tmp_path, capsys):
    ref = make_version(seed=3, alias="production")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out.jsonl"

    assert cli(["predict", "tiny-model", str(source), "-o", str(out), *ARGS]) == 0
    assert "5 answered, 0 already" in capsys.readouterr().out
    rows = _read(out)
    assert [(r["index"], r["id"]) for r in rows] == list(enumerate("abcde"))
    assert all(r["completion_tokens"] <= 10 and r["finish_reason"] in ("stop", "length") for r in rows)

    with running_gateway(["tiny-model"]) as gw:
        client = gw.client()
        for row in rows:
            if "messages" in row:
                reply = client.chat.completions.create(
                    model="tiny-model", messages=row["messages"], max_tokens=10, temperature=0
                )
                expected = reply.choices[0].message.content
            else:
                reply = client.completions.create(
                    model="tiny-model", prompt=row["prompt"], max_tokens=10, temperature=0
                )
                expected = reply.choices[0].text
            assert row["output"] == expected, row["id"]

    # A stop after two rows (the third half-written): the two are kept as they are, the rest answered.
    kept = [dict(rows[0], output="kept as answered"), rows[1]]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"index": 2, "outp')
    assert cli(["predict", f"tiny-model/{ref.version}", str(source), "-o", str(out), *ARGS]) == 0
    assert "3 answered, 2 already" in capsys.readouterr().out
    again = _read(out)
    assert again[0]["output"] == "kept as answered" and again[1:] == rows[1:]

    runs = mlflow.search_runs(experiment_names=["tuneops-predict"], output_format="list")
    assert len(runs) == 2
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.data.params["input_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert latest.data.tags["tuneops.model_version"] == ref.version
    assert latest.data.metrics["rows_answered"] == 3 and latest.data.metrics["rows_skipped"] == 2
    assert latest.data.metrics["tokens_per_s"] > 0


def test_bad_input_names_the_line_and_writes_nothing(make_version, tmp_path, capsys):
    make_version(alias="production")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(ROWS[0]) + "\n" + '{"id": "x", "text": "no prompt"}\n')
    out = tmp_path / "out.jsonl"
    assert cli(["predict", "tiny-model", str(source), "-o", str(out), *ARGS]) == 2
    assert f"{source}:2: needs 'messages'" in capsys.readouterr().err
    assert not out.exists()
    assert cli(["predict", "nope", str(tmp_path / "missing.jsonl"), "-o", str(out), *ARGS]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.integration
def test_predict_on_real_smollm2_answers_as_the_gateway(make_version, smollm2, tmp_path, capsys):
    make_version("real-model", seed=0, base_dir=smollm2.path, alias="production")
    source = tmp_path / "in.jsonl"
    chats = [r for r in ROWS if "messages" in r]
    source.write_text("".join(json.dumps(r) + "\n" for r in chats))
    out = tmp_path / "out.jsonl"
    args = ["--max-tokens", "24", "--dtype", "fp32", "--batch-size", "4", "--no-progress"]
    assert cli(["predict", "real-model", str(source), "-o", str(out), *args]) == 0
    rows = _read(out)
    with running_gateway(["real-model"]) as gw:
        client = gw.client()
        for row in rows:
            reply = client.chat.completions.create(
                model="real-model", messages=row["messages"], max_tokens=24, temperature=0
            )
            assert row["output"] == reply.choices[0].message.content and row["output"].strip(), row["id"]
