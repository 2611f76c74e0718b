"""The model card says the same thing in Markdown and HTML, and escapes what it quotes."""

from __future__ import annotations

from core.registry import Manifest
from evaluate import model_card
from evaluate.bootstrap import mean_metric
from evaluate.gates import judge, parse_gate
from evaluate.results import SuiteResult
from evaluate.verdict import Verdict


def test_card_lists_lineage_metrics_and_every_gate_in_both_formats():
    quality = SuiteResult(
        "quality",
        metrics={
            "model": {"rougeL": mean_metric([0.2, 0.3])},
            "base": {"rougeL": mean_metric([0.1, 0.2])},
        },
    )
    gates = judge([parse_gate("rougeL >= base"), parse_gate("rougeL >= 0.9")], quality.metrics, 200, 0.95, 0)
    verdict = Verdict("faq", "3", False, gates, "evalrun")
    inputs = model_card.CardInputs(
        label="faq/3",
        manifest=Manifest("smollm2-135m-instruct", "sha256:abc", None, "<|im_end|>", job_name="faq <job>"),
        training={"run_id": "trainrun", "datasets": [{"name": "train", "digest": "d1", "source": "local"}]},
        results={"quality": quality},
        sources={"quality: validation.jsonl": "training run trainrun (2 items)"},
        verdict=verdict,
        production_label=None,
    )
    blocks = model_card.build(inputs)
    md, html = model_card.to_markdown(blocks), model_card.to_html(blocks)
    for text in (md, html):
        assert "sha256:abc" in text and "trainrun" in text and "digest d1" in text
        assert "rougeL &gt;= 0.9" in text or "rougeL >= 0.9" in text
        assert "FAIL" in text
    assert "| rougeL | 0.25 | 0.15 |" in md
    assert "faq &lt;job&gt;" in html and "<job>" not in html
    assert "<b>FAIL</b>" in html


def test_card_of_an_evaluation_without_gates_says_so():
    verdict = Verdict("faq", "4", True, [], "evalrun")
    inputs = model_card.CardInputs(
        label="faq/4",
        manifest=Manifest("smollm2-135m-instruct", "sha256:abc", None, "<|im_end|>", job_name="faq"),
        training={"run_id": "trainrun", "datasets": []},
        results={},
        sources={},
        verdict=verdict,
        production_label=None,
    )
    md = model_card.to_markdown(model_card.build(inputs))
    assert "Verdict: **NO GATES**" in md and "PASS" not in md


def _bias_inputs(n_gates: int = 2) -> model_card.CardInputs:
    import numpy as np

    from evaluate.gates import skipped_result

    rng = np.random.default_rng(0)
    base = (rng.uniform(size=200) < 0.55).astype(float)
    crows = SuiteResult(
        "crows",
        metrics={
            "model": {"crows_pct_stereotype": mean_metric(base, scale=100.0)},
            "base": {"crows_pct_stereotype": mean_metric(base, scale=100.0)},
        },
        breakdown={"model": {"crows_pct_stereotype.age": 50.0}, "base": {"crows_pct_stereotype.age": 48.0}},
    )
    texts = ["(crows_pct_stereotype - base).upper <= 5", "crows_pct_stereotype.upper <= base + 5"][:n_gates]
    texts += [f"crows_pct_stereotype <= {60 + i}" for i in range(max(0, n_gates - 2))]
    gates = judge([parse_gate(t) for t in texts], crows.metrics, 200, 0.95, 0)
    verdict = Verdict("faq", "5", True, gates, "evalrun", skipped=[skipped_result("rougeL >= base")])
    return model_card.CardInputs(
        label="faq/5",
        manifest=Manifest("smollm2-135m-instruct", "sha256:abc", None, "<|im_end|>", job_name="faq"),
        training={"run_id": "trainrun", "datasets": []},
        results={"crows": crows},
        sources={"crows": "evaluate/suites/crows_pairs/crows_pairs_anonymized.csv (200 of 1508 pairs)"},
        verdict=verdict,
        production_label=None,
    )


def test_card_shows_value_interval_and_threshold_of_each_gate_and_the_skipped_ones():
    inputs = _bias_inputs()
    md = model_card.to_markdown(model_card.build(inputs))
    paired, bound = inputs.verdict.gates
    assert paired.value == 0.0 and paired.ci == (0.0, 0.0)  # identical answers: the paired difference is exactly 0
    assert "| (crows_pct_stereotype - base).upper <= 5 | 0 | [0, 0] | upper bound 0 | 5 | pass |" in md
    lo, hi = bound.ci
    assert f"| crows_pct_stereotype.upper <= base + 5 | {bound.value:.4g} | [{lo:.4g}, {hi:.4g}] |" in md
    assert "| rougeL >= base | n/a | n/a | n/a | n/a | skipped | 'quality' suite not run |" in md
    assert "95% interval" in md and "| age | 50 | 48 |" in md


def test_registry_description_is_the_card_summary_within_the_registry_limit():
    short = model_card.registry_description(_bias_inputs())
    assert short.startswith("**PARTIAL**") and "runs:/evalrun/model_card.html" in short
    assert "| (crows_pct_stereotype - base).upper <= 5 |" in short and "| crows_pct_stereotype |" in short
    long = model_card.registry_description(_bias_inputs(n_gates=120))
    assert len(long) <= model_card.DESCRIPTION_LIMIT and "cut; see runs:/evalrun/model_card.md" in long
