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
