"""Served traffic as MLflow traces: the record every stage reads, how it is written, masked and read back.

The gateway writes one trace per answered request into the experiment `traffic/<model>` (the template is
configurable); monitoring and retraining read them back with `read_traffic`. Writer and reader live together
here so the stored layout has one definition.

Layout of one trace:
- trace metadata `tuneops.*` (immutable): model, version, alias, endpoint, API-key label, status, HTTP status,
  error, finish reasons (JSON list), token counts, TTFT and latency in seconds, whether content was captured;
  MLflow's own `mlflow.trace.tokenUsage` and `mlflow.trace.user` (the key label) for its UI;
- tag `tuneops.request_id`: the OpenAI response id (`chatcmpl-...`, `cmpl-...`), searchable, also the
  trace's `client_request_id`;
- one root span (type CHAT_MODEL or LLM): inputs `{"messages": [...]}` or `{"prompt": ...}` and outputs
  `{"choices": [...]}`, masked with `mask_pii`, or both empty when content is not captured; an event
  `first_token` at the time of the first token.

Feedback is an MLflow feedback assessment named `user_rating` on the trace, from a HUMAN source whose id is the
API-key label; its value is the rating normalised to [0, 1] (good=1, bad=0, 1-5 -> (r-1)/4), its rationale the
comment, and its metadata holds `raw_rating` and, when given, `correction` (the corrected answer, masked). A
correction is also logged as an MLflow expectation `expected_response`, so MLflow's evaluation datasets built
from these traces carry it.

Traces are written with an explicit tracking URI and experiment (never the process's active experiment or
tracer), so several gateways and tests in one process each write to their own store.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Trace

DEFAULT_TEMPLATE = "traffic/{model}"
RATING_NAME = "user_rating"
CORRECTION_NAME = "expected_response"
REQUEST_ID_TAG = "tuneops.request_id"
META = "tuneops."
ANONYMOUS = "anonymous"  # the feedback source when the gateway has no API keys


@dataclass(frozen=True)
class Feedback:
    """One rating of one answer."""

    rating: float  # normalised to [0, 1]: good=1, bad=0, 1-5 -> (r-1)/4
    raw_rating: str | int  # what the client sent ("good", "bad", 1..5)
    comment: str | None
    correction: str | None  # a corrected answer, masked like content
    source: str  # the API-key label that rated it


@dataclass(frozen=True)
class TrafficRecord:
    """One answered (or failed) request as the gateway saw it."""

    trace_id: str
    request_id: str  # the OpenAI response id ("chatcmpl-..." / "cmpl-...")
    model: str  # served model name
    version: str  # registered version number
    alias: str | None  # alias the request named, if any
    endpoint: str  # "chat" | "completions"
    api_key_label: str | None
    started_at: datetime  # UTC
    status: str  # "ok" | "error"
    http_status: int
    error: str | None
    finish_reasons: tuple[str, ...]  # one per choice
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    messages: list[dict] | None  # chat messages as sent (masked); None when content not captured
    prompt: str | None  # completions prompt, or the last user message for chat (masked); None when not captured
    completion: str | None  # first choice's text (masked); None when not captured
    feedback: tuple[Feedback, ...] = field(default=())


def traffic_experiment(model: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The experiment holding `model`'s traffic."""
    return template.format(model=model)


# --- masking ---------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_ACCOUNT = re.compile(
    r"(?i)\b((?:bank\s+)?(?:account|acct|a/c)(?:\s*(?:number|num|no\.?|nr\.?|#))?\s*[:#]?\s*)"
    r"(\d[\d -]{4,30}\d)"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){6,13}(?!\w)"
    r"|(?<![\w+])\+\d{1,3}(?:[ .-]?\d){6,13}(?!\w)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if _luhn(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = re.sub(r"\D", "", text)
    # A plain 7-8 digit run or a date (2024-01-15) is too often not a phone number; with a + or 9+ digits it is.
    if text.startswith("+") or len(digits) >= 9 or re.fullmatch(r"\d{3}[ .-]\d{4}", text):
        return "[PHONE]"
    return text


def mask_pii(text: str) -> str:
    """`text` with e-mail addresses, IBANs, card numbers (Luhn-valid), account numbers and phone numbers masked.

    Each becomes a placeholder ([EMAIL], [IBAN], [CARD], [ACCOUNT], [PHONE]), so a masked prompt still reads as
    a question and can be trained on. Checked in that order: a card number is not also taken for a phone number.
    """
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IBAN.sub("[IBAN]", text)
    text = _CARD.sub(_card, text)
    text = _ACCOUNT.sub(lambda m: m.group(1) + "[ACCOUNT]", text)
    return _PHONE.sub(_phone, text)


def normalise_rating(raw: str | int) -> float:
    """good=1, bad=0, 1..5 -> (r-1)/4; anything else is a ValueError."""
    if isinstance(raw, str):
        if raw in ("good", "bad"):
            return 1.0 if raw == "good" else 0.0
        raise ValueError(f"rating must be 'good', 'bad' or 1-5, not {raw!r}")
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 5:
        raise ValueError(f"rating must be 'good', 'bad' or 1-5, not {raw!r}")
    return (raw - 1) / 4


# --- writing ---------------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """What the gateway hands over for one request; `write_trace` turns it into a trace.

    Its texts are stored as given: whoever builds one masks them first (the gateway's writer does, off the
    request path).
    """

    request_id: str
    model: str
    version: str
    alias: str | None
    endpoint: str
    api_key_label: str | None
    started_at: float  # epoch seconds
    status: str
    http_status: int
    error: str | None
    finish_reasons: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    messages: list[dict] | None = None  # None when content is not captured
    prompt: str | None = None
    completions: list[str] | None = None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created when missing (a concurrent creator's id is taken)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def write_trace(tracking_uri: str, experiment: str, cap: Capture) -> str:
    """Write `cap` as one trace (info and root span) into experiment id `experiment`; returns the trace id."""
    from mlflow.entities import Span, SpanType, TraceData, TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.client import TracingClient
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import SpanContext, Status, StatusCode

    otel_trace = random.getrandbits(128) or 1
    trace_id = f"tr-{otel_trace:032x}"
    start_ns = int(cap.started_at * 1e9)
    end_ns = start_ns + int(cap.latency_s * 1e9)
    content = cap.messages is not None or cap.prompt is not None or cap.completions is not None
    inputs: dict[str, Any] = {}
    if cap.messages is not None:
        inputs["messages"] = cap.messages
    elif cap.prompt is not None:
        inputs["prompt"] = cap.prompt
    outputs: dict[str, Any] = {"choices": cap.completions} if cap.completions is not None else {}
    usage = {
        "input_tokens": cap.prompt_tokens,
        "output_tokens": cap.completion_tokens,
        "total_tokens": cap.prompt_tokens + cap.completion_tokens,
    }
    span_type = SpanType.CHAT_MODEL if cap.endpoint == "chat" else SpanType.LLM
    attributes = {
        SpanAttributeKey.REQUEST_ID: json.dumps(trace_id),
        SpanAttributeKey.SPAN_TYPE: json.dumps(span_type),
        SpanAttributeKey.INPUTS: json.dumps(inputs, ensure_ascii=False),
        SpanAttributeKey.OUTPUTS: json.dumps(outputs, ensure_ascii=False),
        SpanAttributeKey.CHAT_USAGE: json.dumps(usage),
        SpanAttributeKey.MODEL: json.dumps(f"{cap.model}/{cap.version}"),
    }
    ctx = SpanContext(trace_id=otel_trace, span_id=random.getrandbits(64) or 1, is_remote=False)
    events = []
    if cap.ttft_s is not None:
        events.append(Event("first_token", {}, timestamp=start_ns + int(cap.ttft_s * 1e9)))
    ok = cap.status == "ok"
    otel = ReadableSpan(
        name="chat.completions" if cap.endpoint == "chat" else "completions",
        context=ctx,
        parent=None,
        resource=Resource.get_empty(),
        attributes=attributes,
        events=events,
        start_time=start_ns,
        end_time=end_ns,
        status=Status(StatusCode.OK) if ok else Status(StatusCode.ERROR, cap.error or ""),
    )
    span = Span(otel)
    metadata = {
        META + "model": cap.model,
        META + "version": cap.version,
        META + "alias": cap.alias or "",
        META + "endpoint": cap.endpoint,
        META + "api_key_label": cap.api_key_label or "",
        META + "status": cap.status,
        META + "http_status": str(cap.http_status),
        META + "error": cap.error or "",
        META + "finish_reasons": json.dumps(list(cap.finish_reasons)),
        META + "prompt_tokens": str(cap.prompt_tokens),
        META + "completion_tokens": str(cap.completion_tokens),
        META + "ttft_s": "" if cap.ttft_s is None else repr(cap.ttft_s),
        META + "latency_s": repr(cap.latency_s),
        META + "content": "true" if content else "false",
        TraceMetadataKey.TOKEN_USAGE: json.dumps(usage),
    }
    if cap.api_key_label:
        metadata[TraceMetadataKey.TRACE_USER] = cap.api_key_label
    preview_in = _preview(cap.messages[-1]["content"] if cap.messages else cap.prompt)
    preview_out = _preview(cap.completions[0] if cap.completions else None)
    info = TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment),
        request_time=start_ns // 1_000_000,
        state=TraceState.OK if ok else TraceState.ERROR,
        execution_duration=(end_ns - start_ns) // 1_000_000,
        client_request_id=cap.request_id,
        request_preview=preview_in,
        response_preview=preview_out,
        trace_metadata=metadata,
        tags={REQUEST_ID_TAG: cap.request_id, "mlflow.traceName": otel.name},
    )
    tracing = TracingClient(tracking_uri)
    stored = tracing.start_trace(info)
    try:
        tracing.log_spans(experiment, [span])
    except NotImplementedError:  # a store without span logging keeps spans as a trace artifact
        tracing._upload_trace_data(stored, TraceData(spans=[span]))
    return trace_id


def _preview(text: str | None) -> str | None:
    return None if text is None else text[:1000]


def find_trace(client: MlflowClient, experiment: str, request_id: str) -> str | None:
    """The trace id of the request `request_id` in experiment id `experiment`, or None."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", request_id):
        return None  # never let a client-supplied id into a filter string unchecked
    found = client.search_traces(
        locations=[experiment],
        filter_string=f"tag.`{REQUEST_ID_TAG}` = '{request_id}'",
        max_results=1,
        include_spans=False,
    )
    return found[0].info.trace_id if found else None


def log_feedback(client: MlflowClient, trace_id: str, fb: Feedback) -> str:
    """Attach `fb` to the trace as MLflow feedback (and its correction as an expectation); the feedback's id."""
    from mlflow.entities import AssessmentSource, AssessmentSourceType, Expectation
    from mlflow.entities import Feedback as MlflowFeedback
    from mlflow.tracing.client import TracingClient

    tracing = TracingClient(client.tracking_uri)
    source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=fb.source)
    metadata = {"raw_rating": str(fb.raw_rating)}
    if fb.correction is not None:
        metadata["correction"] = fb.correction
    stored = tracing.log_assessment(
        trace_id,
        MlflowFeedback(name=RATING_NAME, value=fb.rating, source=source, rationale=fb.comment, metadata=metadata),
    )
    if fb.correction is not None:
        tracing.log_assessment(trace_id, Expectation(name=CORRECTION_NAME, value=fb.correction, source=source))
    return stored.assessment_id or ""


# --- reading ---------------------------------------------------------------------------------------------------


def read_traffic(
    client: MlflowClient, model: str, since: datetime | None, template: str = DEFAULT_TEMPLATE
) -> list[TrafficRecord]:
    """Every request to `model` since `since` (all when None), oldest first, with its feedback.

    An experiment that does not exist yet holds no traffic: the answer is an empty list.
    """
    found = client.get_experiment_by_name(traffic_experiment(model, template))
    if found is None:
        return []
    filter_string = None
    if since is not None:
        filter_string = f"trace.timestamp_ms >= {int(since.timestamp() * 1000)}"
    records: list[TrafficRecord] = []
    token = None
    while True:
        page = client.search_traces(
            locations=[found.experiment_id],
            filter_string=filter_string,
            max_results=500,
            order_by=["timestamp_ms ASC"],
            page_token=token,
        )
        records.extend(r for r in (_record(t) for t in page) if r is not None)
        token = page.token
        if not token:
            break
    records.sort(key=lambda r: r.started_at)
    return records


def _record(trace: Trace) -> TrafficRecord | None:
    info = trace.info
    meta = info.trace_metadata
    if META + "model" not in meta:
        return None  # a trace some other writer put into the experiment

    def num(key: str) -> float | None:
        value = meta.get(META + key, "")
        return float(value) if value else None

    content = meta.get(META + "content") == "true"
    messages: list[dict] | None = None
    prompt = completion = None
    if content:
        root = next((s for s in trace.data.spans if s.parent_id is None), None)
        inputs = (root.inputs if root is not None else None) or {}
        outputs = (root.outputs if root is not None else None) or {}
        if "messages" in inputs:
            messages = list(inputs["messages"])
            users = [m.get("content", "") for m in messages if m.get("role") == "user"]
            prompt = users[-1] if users else None
        else:
            prompt = inputs.get("prompt")
        choices = outputs.get("choices") or []
        completion = choices[0] if choices else None
    return TrafficRecord(
        trace_id=info.trace_id,
        request_id=info.tags.get(REQUEST_ID_TAG) or info.client_request_id or "",
        model=meta[META + "model"],
        version=meta.get(META + "version", ""),
        alias=meta.get(META + "alias") or None,
        endpoint=meta.get(META + "endpoint", ""),
        api_key_label=meta.get(META + "api_key_label") or None,
        started_at=datetime.fromtimestamp(info.request_time / 1000, tz=UTC),
        status=meta.get(META + "status", "ok"),
        http_status=int(meta.get(META + "http_status") or 200),
        error=meta.get(META + "error") or None,
        finish_reasons=tuple(json.loads(meta.get(META + "finish_reasons") or "[]")),
        prompt_tokens=int(meta.get(META + "prompt_tokens") or 0),
        completion_tokens=int(meta.get(META + "completion_tokens") or 0),
        ttft_s=num("ttft_s"),
        latency_s=num("latency_s") or 0.0,
        messages=messages,
        prompt=prompt,
        completion=completion,
        feedback=tuple(_feedback(a) for a in info.assessments if a.name == RATING_NAME and a.valid is not False),
    )


def _feedback(a: Any) -> Feedback:
    meta = a.metadata or {}
    raw: str | int = meta.get("raw_rating", "")
    if isinstance(raw, str) and raw.isdigit():
        raw = int(raw)
    return Feedback(
        rating=float(a.value),
        raw_rating=raw,
        comment=a.rationale,
        correction=meta.get("correction"),
        source=a.source.source_id if a.source else ANONYMOUS,
    )
