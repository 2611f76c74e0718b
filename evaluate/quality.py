"""Quality on held-out items: teacher-forced loss/perplexity of the reference, and greedy-answer overlap.

Loss counts the answer tokens only (the reference plus the EOS the server stops on), as training does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from core.chat import prompt_ids
from evaluate.bootstrap import mean_metric, ratio_metric
from evaluate.readers import QualityItem
from evaluate.results import SuiteResult
from evaluate.scoring import Subject, continuation_logprobs, generate_greedy
from evaluate.text_metrics import exact_match, rouge_l, token_f1


def _prompts(subject: Subject, items: list[QualityItem]) -> list[list[int]]:
    return [prompt_ids(subject.tokenizer, it.messages, subject.chat_template, subject.system_prompt) for it in items]


def _answer_ids(subject: Subject, reference: str) -> list[int]:
    ids = subject.tokenizer(reference, add_special_tokens=False)["input_ids"]
    return [*ids, subject.eos_ids[0]]


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def run_quality(
    subjects: dict[str, Subject],
    items: list[QualityItem],
    max_new_tokens: int,
    batch_size: int,
    exact_match_max_words: int,
) -> SuiteResult:
    """Score every subject on the same items; metrics are paired item by item."""
    result = SuiteResult("quality")
    short = np.array([len(it.reference.split()) <= exact_match_max_words for it in items])
    rows: list[dict[str, Any]] = [
        {"id": it.id, "source": it.source, "prompt": it.messages[-1]["content"], "reference": it.reference}
        for it in items
    ]
    for label, subject in subjects.items():
        prompts = _prompts(subject, items)
        pairs = [(p, _answer_ids(subject, it.reference)) for p, it in zip(prompts, items, strict=True)]
        logprobs = continuation_logprobs(subject, pairs, batch_size, desc="quality: scoring references")
        nll = np.array([-lp.sum() for lp in logprobs])
        ntok = np.array([lp.size for lp in logprobs], dtype=float)
        answers = generate_greedy(subject, prompts, max_new_tokens, batch_size, desc="quality: answering")
        rouge = np.array([rouge_l(a, it.reference) for a, it in zip(answers, items, strict=True)])
        f1 = np.array([token_f1(a, it.reference) for a, it in zip(answers, items, strict=True)])
        em = np.array([exact_match(a, it.reference) for a, it in zip(answers, items, strict=True)])
        metrics = {
            "loss": ratio_metric(nll, ntok),
            "perplexity": ratio_metric(nll, ntok, _exp),
            "rougeL": mean_metric(rouge),
            "token_f1": mean_metric(f1),
        }
        if short.any():
            metrics["exact_match"] = mean_metric(em[short])
        result.metrics[label] = metrics
        by_source: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_source[it.source].append(i)
        if len(by_source) > 1:
            result.breakdown[label] = {
                f"{src}.{name}": float(vals[idx].mean())
                for src, idx in by_source.items()
                for name, vals in (("rougeL", rouge), ("token_f1", f1))
            }
        for i, row in enumerate(rows):
            row[f"answer_{label}"] = answers[i]
            row[f"rougeL_{label}"] = round(float(rouge[i]), 4)
            row[f"token_f1_{label}"] = round(float(f1[i]), 4)
            row[f"loss_{label}"] = round(float(nll[i] / ntok[i]), 4)
    result.rows = rows
    result.charts["Quality: ROUGE-L and token F1"] = {
        name: {label: m[name].value for label, m in result.metrics.items()} for name in ("rougeL", "token_f1")
    }
    return result
