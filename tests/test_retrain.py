"""`tuneops retrain`: rated and corrected production answers, masked and deduplicated, train the next version,
which the pipeline gates against production; every step is a run that names the one before it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from test_monitor_support import FAQ, send

from core.aliases import VERDICT_TAG
from core.registry import CANDIDATE, PRODUCTION, connect, current_alias
from core.traffic import Feedback, TrafficRecord, log_feedback, normalise_rating
from tuneops.cli import run
from tuneops.retrain import TRACES_ARTIFACT, new_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rated(i: int, *ratings: str | int, correction: str | None = None, **kw) -> TrafficRecord:
    fields = {
        "trace_id": f"tr-{i}",
        "request_id": f"chatcmpl-{i}",
        "model": "pipe",
        "version": "1",
        "alias": None,
        "endpoint": "chat",
        "api_key_label": "a",
        "started_at": datetime.now(UTC),
        "status": "ok",
        "http_status": 200,
        "error": None,
        "finish_reasons": ("stop",),
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "ttft_s": None,
        "latency_s": 0.1,
        "messages": [{"role": "user", "content": f"Question {i}: mail me at anna@example.com"}],
        "prompt": f"Question {i}: mail me at anna@example.com",
        "completion": f"Answer {i}.",
        "feedback": tuple(
            Feedback(normalise_rating(r), r, None, correction if k == len(ratings) - 1 else None, "a")
            for k, r in enumerate(ratings)
        ),
    }
    fields.update(kw)
    return TrafficRecord(**fields)


def test_new_examples_take_good_answers_and_corrections_masked_and_leave_the_rest():
    records = [
        rated(1, "good"),
        rated(2, 5, 4),
        rated(3, "good", "bad"),  # a bad rating among good ones: not an example
        rated(4, "bad", correction="Call +46 70 123 45 67 for a visit."),  # a correction wins
        rated(5),  # unrated
        rated(6, "good", messages=None, prompt=None, completion=None),  # content not captured
        rated(7, "good"),
        rated(8, 3),  # middling: not good
    ]
    examples, skipped = new_examples(records, used={"tr-7"})
    assert [(e.trace_id, e.origin) for e in examples] == [("tr-1", "rated"), ("tr-2", "rated"), ("tr-4", "corrected")]
    assert examples[0].messages == [
        {"role": "user", "content": "Question 1: mail me at [EMAIL]"},
        {"role": "assistant", "content": "Answer 1."},
    ]
    assert examples[2].messages[-1]["content"] == "Call [PHONE] for a visit."
    assert skipped == {"already_used": 1, "not_captured": 1, "not_good": 2, "unrated": 1}


def write_job(tmp_path: Path, tiny_base: Path) -> Path:
    rows = [{"instruction": q, "output": f"Our answer number {i}: yes, we handle that."} for i, q in enumerate(FAQ * 4)]
    for i, row in enumerate(rows):
        row["instruction"] += f" ({i})"
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "model": {"base": str(tiny_base)},
        "data": {"path": str(data), "max_length": 256, "validation_split": 0.2},
        "lora": {"r": 4, "alpha": 8},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 4, "eval_steps": 2},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "retrain-test"},
        "registry": {"model_name": "pipe", "promote": "auto"},
        "evaluation": {
            "suites": ["quality"],
            "max_examples": 3,
            "max_new_tokens": 4,
            "bootstrap_samples": 100,
            "gates": ["perplexity <= 2 * base", "perplexity <= 1.5 * production"],
        },
        "monitoring": {
            "min_ratings": 4,
            "min_prompts": 8,
            "bias_prompts": 1,
            "bias_max_new_tokens": 4,
            "permutations": 10,
            "bootstrap_samples": 100,
            "checks": ["bad_feedback_share <= 0.1", "drift_oov_share <= 0.9", "drift_domain_auc <= 1"],
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_monitor_failure_retrains_on_rated_traffic_and_gates_version_2_against_version_1(
    tmp_path, tiny_base, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the SQLite store's artifacts land in ./mlruns
    job = write_job(tmp_path, tiny_base)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert run(["pipeline", str(job)]) == 0
    client = connect(uri)
    assert current_alias(client, "pipe", PRODUCTION) == "1"
    capsys.readouterr()

    # Nothing rated yet: refused, and no run is made.
    ids = send(uri, "pipe", "1", 10)
    assert run(["retrain", str(job), "--from", "pipe"]) == 2
    assert "no new rated data for pipe: 10 request(s) in the window" in capsys.readouterr().err

    for trace_id in ids[:3]:
        log_feedback(client, trace_id, Feedback(1.0, "good", None, None, "team-a"))
    log_feedback(client, ids[3], Feedback(0.0, "bad", "wrong", "We build carports; ask us at x@y.se.", "team-a"))
    log_feedback(client, ids[4], Feedback(0.0, "bad", "wrong", None, "team-a"))
    assert run(["monitor", "pipe", "--config", str(job), "--retrain", str(job)]) == 1
    out = capsys.readouterr().out
    assert "FAIL     bad_feedback_share <= 0.1: value 0.4" in out
    # Version 1 has a training run: drift compares the window with its training prompts.
    assert "PASS     drift_oov_share <= 0.9" in out and "PASS     drift_domain_auc <= 1" in out
    assert "a check failed: retraining with" in out and "3 rated good, 1 corrected" in out
    assert "pipe/2: promoted to production" in out
    assert current_alias(client, "pipe", PRODUCTION) == "2" and current_alias(client, "pipe", CANDIDATE) == "2"

    # The lineage, from the version back to the traffic.
    version = client.get_model_version("pipe", "2")
    assert version.tags[VERDICT_TAG] == "pass"
    retrain_run = client.get_run(version.tags["tuneops.retrain_run"])
    training_run = client.get_run(version.run_id)
    monitoring_run = client.get_run(retrain_run.data.tags["tuneops.trigger_run"])
    assert monitoring_run.data.tags["tuneops.kind"] == "monitoring"
    assert training_run.data.tags["mlflow.parentRunId"] == retrain_run.info.run_id
    assert training_run.data.tags["tuneops.trigger_run"] == monitoring_run.info.run_id
    assert retrain_run.data.tags["tuneops.version"] == "pipe/2" and retrain_run.data.tags["tuneops.promoted"] == "true"
    trained_on = set(ids[:4])
    artifacts = Path(retrain_run.info.artifact_uri.removeprefix("file://"))
    assert set(json.loads((artifacts / TRACES_ARTIFACT).read_text())["trace_ids"]) == trained_on
    (dataset_input,) = retrain_run.inputs.dataset_inputs
    assert dataset_input.dataset.name.startswith("job-retrain-")
    from mlflow.genai.datasets import get_dataset

    records = get_dataset(dataset_id=retrain_run.data.tags["tuneops.evaluation_dataset"]).to_df()
    assert {s.source_data["trace_id"] for s in records["source"]} == trained_on
    corrected = [e["expected_response"] for e in records["expectations"] if "carports" in e["expected_response"]]
    assert corrected == ["We build carports; ask us at [EMAIL]."]
    # The new version was trained on the job's data plus the four new examples, and evaluated beside production.
    report = json.loads((Path(training_run.info.artifact_uri.removeprefix("file://")) / "data/report.json").read_text())
    assert report["rows_read"] == 20 + 4
    evaluation = client.get_run(training_run.data.tags["tuneops.evaluation_run"])
    assert "eval.production.perplexity" in evaluation.data.metrics

    # The same traffic again: nothing new.
    assert run(["retrain", str(job), "--from", "pipe"]) == 2
    assert "already used 4" in capsys.readouterr().err
