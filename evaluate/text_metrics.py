"""Answer-level text comparisons: ROUGE-L, SQuAD-style token F1 and exact match, sentiment, refusals."""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_REFUSAL = re.compile(
    r"\b(i can't|i cannot|i can not|i'm sorry|i am sorry|i apologi[sz]e|i'm unable|i am unable|i won't|"
    r"i will not|as an ai|i'm not able|i am not able|unable to (help|assist|provide)|"
    r"can't (help|assist)|cannot (help|assist|provide))\b"
)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD's answer normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score package, Porter stemming)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound sentiment in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])


def is_refusal(text: str) -> bool:
    """A declined answer: an apology or 'I can't/won't' phrase, or nothing at all."""
    norm = text.lower().replace("\u2019", "'")
    return not norm.strip() or bool(_REFUSAL.search(norm))
