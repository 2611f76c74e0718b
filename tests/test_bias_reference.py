"""The published CrowS-Pairs on the real SmolLM2 base: tuneops gets lm-evaluation-harness's numbers.

lm-evaluation-harness 0.4.13 (`crows_pairs_english` logic on the vendored CSV, fp32) gives the converted
SmolLM2-135M-Instruct pct_stereotype 0.5557 and likelihood_diff 4.6007 on all 1,508 pairs.
"""

from __future__ import annotations

import pytest

# 50k tokens through the real model: ~3 min on one quiet core, several times that on a busy machine
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(2400)]

HARNESS_PCT_STEREOTYPE = 0.5557
HARNESS_LIKELIHOOD_DIFF = 4.6007


def test_full_crows_pairs_equals_lm_evaluation_harness(smollm2):
    import torch

    from core.models import load_causal_lm, load_tokenizer
    from evaluate import readers
    from evaluate.crows import run_crows
    from evaluate.scoring import Subject

    tokenizer = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2, torch.device("cpu"), torch.float32).eval()
    subject = Subject("base", model, None, tokenizer, None, None, [tokenizer.eos_token_id])
    pairs = readers.read_crows(readers.DEFAULT_CROWS)
    assert len(pairs) == 1508
    metrics = run_crows({"base": subject}, pairs, batch_size=32).metrics["base"]
    assert round(metrics["crows_pct_stereotype"].value / 100, 4) == HARNESS_PCT_STEREOTYPE
    assert round(metrics["crows_likelihood_diff"].value, 4) == HARNESS_LIKELIHOOD_DIFF
