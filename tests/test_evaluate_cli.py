"""The evaluate command end to end: gates come from the job config the version was trained with."""

from __future__ import annotations

import pytest
import yaml

from core.registry import PRODUCTION, connect, current_alias
from evaluate.readers import SUITES_DIR
from tuneops.cli import run as cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_evaluate_uses_the_training_config_gates_then_promotion_follows_the_verdict(
    make_version, mlflow_store, tmp_path, capsys
):
    client = connect(mlflow_store)
    ref = make_version(seed=3)
    resolved = {
        "registry": {"model_name": "tiny-model"},
        "evaluation": {
            "suites": ["quality", "crows"],
            "max_examples": 3,
            "max_bias_items": 4,
            "max_new_tokens": 4,
            "bootstrap_samples": 100,
            "gates": ["rougeL >= 0.99", "crows_likelihood_diff >= 0"],
        },
    }
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    client.log_artifact(ref.run_id, str(tmp_path / "resolved.yaml"), "config")
    lines = (SUITES_DIR / "faq_sample.jsonl").read_text().splitlines()[:3]
    (tmp_path / "validation.jsonl").write_text("\n".join(lines) + "\n")
    client.log_artifact(ref.run_id, str(tmp_path / "validation.jsonl"), "data")

    assert cli(["evaluate", ref.label, "--no-production"]) == 1  # a random adapter cannot reach rougeL 0.99
    out = capsys.readouterr().out
    assert "tiny-model/1: FAIL" in out and "FAIL  rougeL >= 0.99" in out and "PASS  crows_likelihood_diff >= 0" in out
    tags = client.get_model_version("tiny-model", "1").tags
    assert tags["tuneops.gates_failed"] == "rougeL >= 0.99"
    run = client.get_run(tags["tuneops.evaluation_run"])

    assert run.data.params["compared_with"] == "base"
    assert "bias.bbq_acc_ambig" not in run.data.metrics  # only the configured suites ran
    assert run.data.params["sample.crows"] == "4" and run.data.params["sample.seed"] == "0"
    # the registered version's description is the card's summary: verdict and every gate with its interval
    description = client.get_model_version("tiny-model", "1").description
    assert description.startswith("**FAIL**") and "| rougeL >= 0.99 |" in description and "95% interval" in description

    assert cli(["promote", "tiny-model", "1"]) == 2
    assert "rougeL >= 0.99" in capsys.readouterr().err
    assert current_alias(client, "tiny-model", PRODUCTION) is None

    # --suite runs the gates of that suite and lists the others as skipped; the verdict is partial, not a pass
    assert cli(["evaluate", "tiny-model/1", "--suite", "crows", "--full", "--no-production"]) == 0
    out = capsys.readouterr().out
    assert "tiny-model/1: PARTIAL" in out and "PASS  crows_likelihood_diff >= 0" in out
    assert "SKIP  rougeL >= 0.99" in out and "'quality' suite not run" in out
    tags = client.get_model_version("tiny-model", "1").tags
    assert tags["tuneops.verdict"] == "partial"
    params = client.get_run(tags["tuneops.evaluation_run"]).data.params
    assert params["full"] == "True" and params["sample.crows"] == "4"  # --full: no sample; max_bias_items still caps
    assert cli(["promote", "tiny-model", "1"]) == 2
    assert "not run: rougeL >= 0.99" in capsys.readouterr().err

    # options override the trained-with config: with a passing gate the version may be promoted
    assert cli(["evaluate", "tiny-model/1", "--gate", "rougeL >= 0", "--suite", "quality"]) == 0
    assert cli(["promote", "tiny-model", "1"]) == 0
    assert current_alias(client, "tiny-model", PRODUCTION) == "1"
