"""Traffic capture: each finished request becomes an MLflow trace, written off the request path.

A request only draws its sample and puts a record into a bounded buffer (no I/O, no masking); one writer thread
masks the content and writes the trace (core/traffic.py). When the buffer is full the record is dropped and
counted (`tuneops:traces_dropped`), so a slow or unreachable tracking server never slows, holds or fails a
request. The writer remembers which completion id became which trace, so feedback on an answer whose trace is
still queued waits for it briefly instead of missing it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from core.registry import PRODUCTION, REF
from core.traffic import Capture, experiment_id, mask_pii, traffic_experiment, write_trace

if TYPE_CHECKING:
    from serve.gateway import Gateway
    from serve.metrics import Metrics
    from serve.serving import PreparedRequest
    from serve.settings import CaptureSettings

log = logging.getLogger(__name__)

REMEMBERED = 4096  # completion ids -> trace ids kept for feedback; older ones are looked up in the store
WARN_EVERY_S = 60.0  # at most one log line per minute about a failing tracking server
FEEDBACK_THREADS = 2  # feedback calls to the tracking server at once; a hung server ties up only these


class TrafficCapture:
    """The bounded buffer and the writer thread of one gateway."""

    def __init__(self, settings: CaptureSettings, tracking_uri: str, metrics: Metrics, models: list[str]) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.metrics = metrics
        self.models = list(models)
        self._queue: queue.Queue[Capture | None] = queue.Queue(settings.buffer_size)
        self._pending: dict[str, threading.Event] = {}  # completion id -> set once its trace is written or lost
        self._written: collections.OrderedDict[str, str] = collections.OrderedDict()  # completion id -> trace id
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned = 0.0
        # Its own threads: a feedback call stuck on an unreachable server never starves the gateway's other work.
        self.feedback_pool = ThreadPoolExecutor(FEEDBACK_THREADS, thread_name_prefix="tuneops-feedback")
        metrics.traces_queued.set_function(self._queue.qsize)

    @classmethod
    def attach(cls, gateway: Gateway) -> TrafficCapture:
        """A capture for `gateway`, hooked into its chat and completion endpoints."""
        from core.registry import tracking_uri

        settings = gateway.settings
        uri = tracking_uri(settings.capture.tracking_uri or settings.tracking_uri)
        capture = cls(settings.capture, uri, gateway.metrics, settings.models)
        if settings.capture.enabled:
            gateway.chat.capture = capture
            gateway.completion.capture = capture
        return capture

    # request path ----------------------------------------------------------------------------------------------

    def finished(
        self,
        prep: PreparedRequest,
        endpoint: str,
        completion_id: str,
        texts: dict[int, str],
        reasons: dict[int, str],
        completion_tokens: int,
        first_token: float | None,
        error: BaseException | None,
    ) -> None:
        """Record one finished request (answered, failed or abandoned); never blocks, never raises."""
        if self._closed or (self.settings.sample_rate < 1.0 and random.random() >= self.settings.sample_rate):
            return
        done = time.perf_counter()
        if error is None:
            status, http_status, message = "ok", 200, None
        else:
            status, http_status = "error", int(getattr(error, "status", 500))
            message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        ref = REF.match(prep.ref)
        alias = None if ref is None or ref["version"] else (ref["alias"] or PRODUCTION)
        content = self.settings.content
        record = Capture(
            request_id=completion_id,
            model=prep.served.model,
            version=prep.served.version,
            alias=alias,
            endpoint=endpoint,
            api_key_label=prep.api_key_label,
            started_at=prep.arrived_at,
            status=status,
            http_status=http_status,
            error=message,
            finish_reasons=tuple(reasons[i] for i in sorted(reasons)),
            prompt_tokens=sum(len(x) for x in prep.prompts),
            completion_tokens=completion_tokens,
            ttft_s=None if first_token is None else first_token - prep.arrived,
            latency_s=done - prep.arrived,
            messages=prep.content if content and endpoint == "chat" else None,
            prompt=_prompt_text(prep.content) if content and endpoint == "completions" else None,
            completions=[texts.get(i, "") for i in sorted(set(texts) | set(reasons))] if content else None,
        )
        with self._lock:
            self._pending[completion_id] = threading.Event()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._forget(completion_id)
            self.metrics.traces_dropped.labels(record.model, "buffer_full").inc()
            return
        self._ensure_thread()

    # feedback --------------------------------------------------------------------------------------------------

    def trace_of(self, completion_id: str) -> str | None:
        """The trace id of a completion, waiting up to `feedback_wait_s` while it is queued (blocking).

        Raises TimeoutError when it is still queued after that; None when no trace has that completion id.
        """
        from mlflow import MlflowClient

        from core.traffic import find_trace

        with self._lock:
            event = self._pending.get(completion_id)
        if event is not None and not event.wait(self.settings.feedback_wait_s):
            raise TimeoutError(completion_id)
        with self._lock:
            if completion_id in self._written:
                return self._written[completion_id]
        client = MlflowClient(self.tracking_uri)
        for model in self.models:
            found = client.get_experiment_by_name(traffic_experiment(model, self.settings.experiment))
            if found is not None:
                trace_id = find_trace(client, found.experiment_id, completion_id)
                if trace_id is not None:
                    return trace_id
        return None

    # writer ----------------------------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._write_all, name="tuneops-capture", daemon=True)
                    self._thread.start()

    def _write_all(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                trace_id = self._write(record)
            except Exception as exc:  # a down or refusing tracking server: count it, keep serving
                self.metrics.traces_dropped.labels(record.model, "write_failed").inc()
                now = time.monotonic()
                if now - self._warned > WARN_EVERY_S:
                    self._warned = now
                    log.warning("traffic capture: writing a trace to %s failed: %s", self.tracking_uri, exc)
                self._forget(record.request_id)
            else:
                self.metrics.traces_written.labels(record.model).inc()
                with self._lock:
                    self._written[record.request_id] = trace_id
                    while len(self._written) > REMEMBERED:
                        self._written.popitem(last=False)
                self._forget(record.request_id)

    def _write(self, record: Capture) -> str:
        from mlflow import MlflowClient

        experiment = self._experiments.get(record.model)
        if experiment is None:
            name = traffic_experiment(record.model, self.settings.experiment)
            experiment = self._experiments[record.model] = experiment_id(MlflowClient(self.tracking_uri), name)
        return write_trace(self.tracking_uri, experiment, _masked(record))

    def _forget(self, completion_id: str) -> None:
        with self._lock:
            event = self._pending.pop(completion_id, None)
        if event is not None:
            event.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records; write what is queued for up to `timeout_s`, then leave the rest (counted)."""
        self._closed = True
        self.feedback_pool.shutdown(wait=False, cancel_futures=True)
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout_s
        while thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        thread.join(max(0.0, deadline - time.monotonic()))
        lost = 0
        while True:
            try:
                record = self._queue.get_nowait()
            except queue.Empty:
                break
            if record is not None:
                lost += 1
                self.metrics.traces_dropped.labels(record.model, "shutdown").inc()
        if lost:
            log.warning("traffic capture: %d traces not written at shutdown", lost)


def _prompt_text(prompts: Any) -> str | None:
    """The completions prompt as text: the first prompt when it is text (token-id prompts have none)."""
    if not prompts:
        return None
    first = prompts[0]
    return first if isinstance(first, str) else None


def _masked(record: Capture) -> Capture:
    """`record` with personal data masked in every text it carries (done here, off the request path)."""
    messages = None
    if record.messages is not None:
        messages = [{**m, "content": mask_pii(str(m.get("content", "")))} for m in record.messages]
    return dataclasses.replace(
        record,
        messages=messages,
        prompt=None if record.prompt is None else mask_pii(record.prompt),
        completions=None if record.completions is None else [mask_pii(t) for t in record.completions],
        error=None if record.error is None else mask_pii(record.error),
    )
