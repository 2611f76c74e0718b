"""Service and feedback measures of a window of traffic: errors, tail latency, cut answers, empty answers, bad
ratings. Each share carries a Wilson interval (scipy), so a handful of requests never reads as a clean bill."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from evaluate.monitoring.checks import Measure

if TYPE_CHECKING:
    from core.traffic import TrafficRecord

BAD_RATING = 0.5  # normalised ratings below this are bad: `bad`, 1 and 2 of 5


def share(hits: int, n: int, confidence: float) -> Measure:
    """hits / n with its Wilson score interval."""
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Measure(hits / n, (float(ci.low), float(ci.high)), n=n)


def service_measures(records: list[TrafficRecord], min_requests: int, confidence: float) -> tuple[dict, str | None]:
    """error_rate, latency_p99_s, truncated_share, empty_share; or the reason they cannot be measured."""
    n = len(records)
    if n < min_requests:
        return {}, f"too little traffic: {n} request(s) in the window, the service checks need {min_requests}"
    errors = sum(r.status != "ok" for r in records)
    ok = [r for r in records if r.status == "ok"]
    out: dict[str, Measure] = {"error_rate": share(errors, n, confidence)}
    latencies = np.array([r.latency_s for r in records], dtype=float)
    out["latency_p99_s"] = Measure(float(np.percentile(latencies, 99)), n=n)
    if ok:
        cut = sum(any(f == "length" for f in r.finish_reasons) for r in ok)
        out["truncated_share"] = share(cut, len(ok), confidence)
        # An answer is empty when it has no tokens, or (content captured) only whitespace.
        empty = sum(r.completion_tokens == 0 or (r.completion is not None and not r.completion.strip()) for r in ok)
        out["empty_share"] = share(empty, len(ok), confidence)
    return out, None


def feedback_measures(records: list[TrafficRecord], min_ratings: int, confidence: float) -> tuple[dict, str | None]:
    """bad_feedback_share over every rating in the window; or why it cannot be measured."""
    ratings = [f.rating for r in records for f in r.feedback]
    if len(ratings) < min_ratings:
        return {}, f"too little feedback: {len(ratings)} rating(s) in the window, the check needs {min_ratings}"
    bad = sum(rating < BAD_RATING for rating in ratings)
    return {"bad_feedback_share": share(bad, len(ratings), confidence)}, None
