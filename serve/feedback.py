"""`POST /v1/feedback`: a rating of one answer, stored as MLflow feedback on that answer's trace.

The trace is found by completion id: among the traces this gateway wrote recently (waiting briefly for one still
queued), else in the traffic experiments of the served models, so feedback reaches answers given by another
replica or before a restart. The comment and the corrected answer are masked like captured content.
"""

from __future__ import annotations

import asyncio

from core.traffic import ANONYMOUS, Feedback, log_feedback, mask_pii, normalise_rating
from serve import protocol as p
from serve.capture import TrafficCapture
from serve.errors import CompletionNotFound, TrackingUnavailable


async def give_feedback(capture: TrafficCapture, req: p.FeedbackRequest, label: str | None) -> p.FeedbackReceipt:
    """Attach the rating to the completion's trace; 404 when there is none, 503 when the store is unreachable."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(
            loop.run_in_executor(capture.feedback_pool, _give, capture, req, label),
            capture.settings.feedback_timeout_s,
        )
    except TimeoutError:
        raise TrackingUnavailable(
            f"The tracking server {capture.tracking_uri} did not answer within "
            f"{capture.settings.feedback_timeout_s:g} s."
        ) from None


def _give(capture: TrafficCapture, req: p.FeedbackRequest, label: str | None) -> p.FeedbackReceipt:
    from mlflow import MlflowClient

    try:
        trace_id = capture.trace_of(req.completion_id)
    except TimeoutError:
        raise TrackingUnavailable(
            f"The trace of completion '{req.completion_id}' is still waiting to be written; retry shortly."
        ) from None
    except Exception as exc:
        raise TrackingUnavailable(f"The tracking server {capture.tracking_uri} is unavailable: {exc}") from None
    if trace_id is None:
        raise CompletionNotFound(req.completion_id)
    fb = Feedback(
        rating=normalise_rating(req.rating),
        raw_rating=req.rating,
        comment=None if req.comment is None else mask_pii(req.comment),
        correction=None if req.correction is None else mask_pii(req.correction),
        source=label or ANONYMOUS,
    )
    try:
        assessment_id = log_feedback(MlflowClient(capture.tracking_uri), trace_id, fb)
    except Exception as exc:
        raise TrackingUnavailable(f"The tracking server {capture.tracking_uri} refused the feedback: {exc}") from None
    return p.FeedbackReceipt(id=assessment_id, completion_id=req.completion_id, trace_id=trace_id, rating=fb.rating)
