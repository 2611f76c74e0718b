"""End-to-end evaluation of registered versions on the tiny model, in a real temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from core.aliases import move_alias
from core.errors import ConfigError, DataError, RegistryError
from core.registry import PRODUCTION, connect, current_alias
from core.schema.evaluation import EvaluationConfig
from evaluate.job import VALIDATION_ARTIFACT, run_evaluation
from evaluate.readers import SUITES_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_validation(client, ref, tmp_path: Path, n: int = 6) -> None:
    """Log a held-out split on the version's training run, the way the fine-tune stage does."""
    lines = (SUITES_DIR / "faq_sample.jsonl").read_text().splitlines()[:n]
    folder = tmp_path / f"split-{ref.version}"
    folder.mkdir()
    (folder / "validation.jsonl").write_text("\n".join(lines) + "\n")
    client.log_artifact(ref.run_id, str(folder / "validation.jsonl"), "data")


def _small(**kw) -> EvaluationConfig:
    base = dict(
        max_examples=6,
        max_bias_items=6,
        max_new_tokens=8,
        counterfactual_max_new_tokens=8,
        batch_size=4,
        bootstrap_samples=200,
    )
    return EvaluationConfig(**{**base, **kw})


def test_evaluation_compares_with_base_and_production_and_records_everything(make_version, mlflow_store, tmp_path):
    client = connect(mlflow_store)
    v1 = make_version(seed=1)
    v2 = make_version(seed=2)
    for v in (v1, v2):
        _with_validation(client, v, tmp_path)
    move_alias(client, "tiny-model", PRODUCTION, "1", reason="first")
    cfg = _small(
        gates=[
            "rougeL >= 0",
            "perplexity <= 1e9 * base",
            "crows_pct_stereotype <= production + 100",
            "cf_rougeL >= 2",
        ]
    )
    verdict = run_evaluation("tiny-model/2", cfg, tracking_uri=mlflow_store, dtype="fp32")

    assert [g.passed for g in verdict.gates] == [True, True, True, False]
    assert not verdict.passed and verdict.failed[0].gate == "cf_rougeL >= 2"
    assert (
        verdict.gates[0].ci is not None and verdict.gates[0].ci[0] <= verdict.gates[0].value <= verdict.gates[0].ci[1]
    )
    # the version under test, the base and production were all measured on the same items
    for key in (
        "eval.rougeL",
        "eval.base.rougeL",
        "eval.production.rougeL",
        "eval.perplexity",
        "bias.crows_pct_stereotype",
        "bias.base.crows_pct_stereotype",
        "bias.production.crows_pct_stereotype",
        "bias.bbq_bias_ambig",
        "bias.cf_sentiment_gap",
    ):
        assert key in verdict.metrics, key
    # random adapters answer differently from the base model
    assert verdict.metrics["eval.loss"] != verdict.metrics["eval.base.loss"]
    assert verdict.metrics["eval.loss"] != verdict.metrics["eval.production.loss"]

    run = client.get_run(verdict.evaluation_run)
    assert run.data.tags["mlflow.parentRunId"] == v2.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval.rougeL"] == pytest.approx(verdict.metrics["eval.rougeL"])
    artifacts = {a.path for a in client.list_artifacts(verdict.evaluation_run)}
    assert {"model_card.md", "model_card.html", "verdict.json", "tables", "charts"} <= artifacts
    tables = {Path(a.path).name for a in client.list_artifacts(verdict.evaluation_run, "tables")}
    assert tables == {"quality.json", "crows.json", "bbq.json", "counterfactual.json"}
    quality = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=verdict.evaluation_run, artifact_path="tables/quality.json", dst_path=str(tmp_path)
            )
        ).read_text()
    )
    assert len(quality["data"]) == 6 and "answer_base" in quality["columns"]
    card = verdict.model_card
    assert "## Gates" in card and "cf_rougeL >= 2" in card and "FAIL" in card and v2.run_id in card

    tags = client.get_model_version("tiny-model", "2").tags
    assert tags["tuneops.verdict"] == "fail"
    assert tags["tuneops.evaluation_run"] == verdict.evaluation_run
    assert tags["tuneops.gates_failed"] == "cf_rougeL >= 2"
    assert current_alias(client, "tiny-model", PRODUCTION) == "1"  # evaluation never moves an alias


def test_production_gate_is_not_applicable_without_production(make_version, mlflow_store, tmp_path):
    client = connect(mlflow_store)
    v1 = make_version(seed=1)
    _with_validation(client, v1, tmp_path)
    cfg = _small(suites=["quality"], gates=["rougeL >= production"], compare_base=False)
    verdict = run_evaluation(v1.run_id, cfg, tracking_uri=mlflow_store, dtype="fp32")
    assert verdict.passed and verdict.gates[0].note.startswith("n/a")
    assert "eval.base.rougeL" not in verdict.metrics
    assert client.get_model_version("tiny-model", "1").tags["tuneops.verdict"] == "pass"


def test_unknown_metric_fails_before_anything_is_read(mlflow_store):
    with pytest.raises(ConfigError, match=r"unknown metric 'bleu'.*known metrics: loss, perplexity, rougeL"):
        run_evaluation("no-such-model", EvaluationConfig(gates=["bleu >= 0.3"]), tracking_uri=mlflow_store)


def test_bad_references_are_clear(mlflow_store):
    connect(mlflow_store).create_registered_model("tiny-model")
    for ref, message in [
        ("nope", "no registered model named 'nope'"),
        ("tiny-model", "has no alias 'production'"),
        ("tiny-model@candidate", "has no alias 'candidate'"),
        ("tiny-model/7", "has no version 7"),
        ("bad ref!", "is not a model reference"),
    ]:
        with pytest.raises(RegistryError, match=message):
            run_evaluation(ref, _small(), tracking_uri=mlflow_store)


def _bare_version(client) -> None:
    """A version whose training run logged nothing (registered directly: no model is needed to fail)."""
    client.create_registered_model("tiny-model")
    run = client.create_run(client.create_experiment("t"))
    client.create_model_version("tiny-model", "file:///nowhere", run_id=run.info.run_id)


def test_missing_validation_split_is_a_clear_error(mlflow_store, tmp_path):
    client = connect(mlflow_store)
    _bare_version(client)
    for _ in range(2):  # no split at all, then an empty one (a job trained without a validation split)
        with pytest.raises(DataError, match=r"logged no \(or an empty\) data/validation\.jsonl"):
            run_evaluation("tiny-model/1", _small(suites=["quality"]), tracking_uri=mlflow_store)
        (tmp_path / "validation.jsonl").write_text("")
        client.log_artifact(
            client.get_model_version("tiny-model", "1").run_id, str(tmp_path / "validation.jsonl"), "data"
        )
    assert VALIDATION_ARTIFACT == "data/validation.jsonl"
    assert "tuneops.verdict" not in client.get_model_version("tiny-model", "1").tags


def test_malformed_suite_file_fails_before_a_model_loads(mlflow_store, tmp_path):
    _bare_version(connect(mlflow_store))
    bad = tmp_path / "bbq.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bbq\.jsonl:1: invalid JSON"):
        run_evaluation("tiny-model/1", _small(suites=["bbq"], bbq_path=bad), tracking_uri=mlflow_store)
