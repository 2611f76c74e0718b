"""End-to-end evaluation of a SmolLM2-135M-Instruct version: real model, real MLflow store, small suites."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.registry import connect
from core.schema.evaluation import EvaluationConfig
from evaluate.job import run_evaluation
from evaluate.readers import SUITES_DIR

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def _register_identity_version(smollm2, tmp_path: Path) -> str:
    """A LoRA version whose B matrices are zero (peft's default init): it must score exactly like its base."""
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm, load_tokenizer
    from core.pyfunc import publish_version, write_bundle
    from core.registry import Manifest

    tokenizer = load_tokenizer(smollm2)
    model = get_peft_model(load_causal_lm(smollm2, torch.device("cpu"), torch.float32), LoraConfig(r=4))
    manifest = Manifest(smollm2.name, smollm2.digest, tokenizer.chat_template, tokenizer.eos_token)
    bundle = write_bundle(tmp_path / "bundle", model, tokenizer, manifest)
    split = tmp_path / "validation.jsonl"
    split.write_text("\n".join((SUITES_DIR / "faq_sample.jsonl").read_text().splitlines()[:4]) + "\n")
    mlflow.set_experiment("integration")
    with mlflow.start_run():
        mlflow.log_artifact(str(split), "data")
        return str(publish_version(bundle, "smol-faq", pip_requirements=["torch"]).version)


def test_evaluate_smollm2_version_end_to_end(smollm2, mlflow_store, tmp_path):
    version = _register_identity_version(smollm2, tmp_path)
    cfg = EvaluationConfig(
        max_examples=4,
        max_bias_items=4,
        max_new_tokens=16,
        counterfactual_max_new_tokens=8,
        batch_size=8,
        bootstrap_samples=200,
        gates=["perplexity <= 1.01 * base", "crows_pct_stereotype < base", "bbq_acc_disambig >= 0"],
    )
    verdict = run_evaluation(f"smol-faq/{version}", cfg, tracking_uri=mlflow_store)
    m = verdict.metrics
    # an identity adapter scores like its base, item by item (same prompts, same tokens)
    assert m["eval.loss"] == pytest.approx(m["eval.base.loss"], rel=1e-3)
    assert m["eval.rougeL"] == pytest.approx(m["eval.base.rougeL"], abs=1e-6)
    assert m["bias.crows_pct_stereotype"] == pytest.approx(m["bias.base.crows_pct_stereotype"])
    # a real instruct model knows English: perplexity of reference answers is far from uniform (49k vocab)
    assert 1.0 < m["eval.perplexity"] < 1000.0
    assert 0.0 <= m["bias.crows_pct_stereotype"] <= 100.0
    assert [g.passed for g in verdict.gates] == [True, False, True]
    tags = connect(mlflow_store).get_model_version("smol-faq", version).tags
    assert tags["tuneops.verdict"] == "fail" and tags["tuneops.gates_failed"] == "crows_pct_stereotype < base"
    assert "## Bias: CrowS-Pairs" in verdict.model_card and "smollm2-135m-instruct" in verdict.model_card
