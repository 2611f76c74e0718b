"""Drift on the real SmolLM2: held-out questions of the default job pass, another domain's questions fail.

The reference is read back the way `tuneops monitor` reads it, from a run that logged the default job's inputs
as a training run does; the prompts are embedded by the base model the version serves on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import load_config
from core.registry import VersionRef, connect
from core.schema.job import JobConfig
from core.schema.monitoring import MonitoringConfig
from evaluate.monitoring import drift
from evaluate.monitoring.checks import FAIL, PASS, judge, parse_checks

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
OTHER_DOMAIN = Path(__file__).parent / "data" / "it_helpdesk_questions.jsonl"


@pytest.fixture(scope="module")
def default_job(tmp_path_factory, smollm2):
    """The default job's inputs logged as its training run logs them; its held-out questions; SmolLM2 as base."""
    import mlflow
    import torch

    from core.models import load_causal_lm, load_tokenizer
    from evaluate.scoring import Subject
    from finetune.job import _log_inputs, check

    root = tmp_path_factory.mktemp("drift")
    uri = f"sqlite:///{root}/mlflow.db"
    client = connect(uri)
    cfg = load_config(JobConfig, ROOT / "configs/default.yaml", [f"training.output_dir={root / 'out'}"])
    checked = check(cfg)
    mlflow.set_experiment("drift")
    with mlflow.start_run() as run:
        _log_inputs(cfg, "default", checked)
    ref = VersionRef("faq-assistant", "1", run.info.run_id, "", ())
    reference, why = drift.training_prompts(client, ref, root / "reference")
    assert reference is not None, why
    held_out = [drift.prompt_of(t.messages) for t in checked.data.validation]
    tokenizer = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2, torch.device("cpu"), torch.float32).eval()
    base = Subject("base", model, None, tokenizer, None, None, [tokenizer.eos_token_id])
    prompts = drift.sample(reference.prompts, CFG.reference_sample, CFG.seed)
    return reference, held_out, base, (prompts, drift.embed(base, prompts, CFG.batch_size))


CFG = MonitoringConfig(reference_sample=200)


def measure(reference: tuple, window: list[str], base) -> list:
    cfg = CFG
    checks = [c for c in parse_checks(cfg.checks) if c.group == "drift"]
    ref, ref_embeddings = reference
    measures = drift.simple_measures(ref, window, cfg.confidence)
    measures.update(
        drift.domain_classifier(
            ref_embeddings,
            drift.embed(base, window, cfg.batch_size),
            cfg.permutations,
            cfg.bootstrap_samples,
            cfg.confidence,
            cfg.seed,
        )
    )
    results = judge(checks, measures, {})
    print("\n".join(r.describe() for r in results))
    return results


def test_held_out_faq_questions_do_not_drift(default_job):
    reference, held_out, base, embedded = default_job
    assert len(reference.prompts) > 300 and "training data of run" in reference.source
    assert not set(held_out) & set(reference.prompts)  # the held-out questions are not the reference
    results = measure(embedded, held_out, base)
    assert [r.verdict for r in results] == [PASS] * len(results)


def test_another_domains_questions_drift(default_job):
    _, _, base, embedded = default_job
    other = [json.loads(line)["prompt"] for line in OTHER_DOMAIN.read_text().splitlines() if line.strip()]
    results = {r.metric: r for r in measure(embedded, other, base)}
    assert results["drift_domain_auc"].verdict == FAIL
    assert results["drift_domain_auc"].ci[0] > 0.9
    assert results["drift_domain_pvalue"].verdict == FAIL  # no permutation of the labels did as well
    assert results["drift_oov_share"].verdict == FAIL
    assert results["drift_language_share"].verdict == PASS  # still English: the meaning moved, not the language
