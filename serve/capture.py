"""Traffic capture: each finished request becomes an MLflow trace, written off the request path.

A request only draws its sample and puts a record into a bounded buffer (no I/O, no masking). A writer process
masks the content and writes the traces (core/traffic.py): a process, not a thread, so the tracking store's
client code (SQLAlchemy for a database URI: ~30 ms of Python per trace) never competes with the engine for the
interpreter lock, and a writer stuck on an unreachable server can be stopped at shutdown. When the buffer is full
the record is dropped and counted (`tuneops:traces_dropped`), so a slow or unreachable tracking server never
slows, holds or fails a request. The writer reports which completion id became which trace, so feedback on an
answer whose trace is still queued waits for it briefly instead of missing it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import queue
import random
import signal
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

# (completion id, model, trace id or None, error or None): what the writer reports per record
Written = tuple[str, str, str | None, str | None]


class TrafficCapture:
    """The bounded buffer, the writer process and what it reported, for one gateway."""

    def __init__(self, settings: CaptureSettings, tracking_uri: str, metrics: Metrics, models: list[str]) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.metrics = metrics
        self.models = list(models)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch and uvicorn threads
        self._ctx = ctx
        self._inbox: Any = None  # multiprocessing queues, made with the writer on first use
        self._outbox: Any = None
        self._writer: Any = None
        self._collector: threading.Thread | None = None
        self._in_flight: collections.Counter[str] = collections.Counter()  # per model: handed over, not reported
        self._pending: dict[str, threading.Event] = {}  # completion id -> set once its trace is written or lost
        self._written: collections.OrderedDict[str, str] = collections.OrderedDict()  # completion id -> trace id
        self._lock = threading.Lock()
        self._closed = False
        self._warned = 0.0
        # Its own threads: a feedback call stuck on an unreachable server never starves the gateway's other work.
        self.feedback_pool = ThreadPoolExecutor(FEEDBACK_THREADS, thread_name_prefix="tuneops-feedback")
        metrics.traces_queued.set_function(lambda: sum(self._in_flight.values()))

    @classmethod
    def attach(cls, gateway: Gateway) -> TrafficCapture:
        """A capture for `gateway`, hooked into its chat and completion endpoints when capture is enabled."""
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
        try:
            self._hand_over(prep, endpoint, completion_id, texts, reasons, completion_tokens, first_token, error)
        except Exception:  # capture must never fail the request it records
            log.exception("traffic capture: a record was lost")
            self.metrics.traces_dropped.labels(prep.served.model, "error").inc()

    def _hand_over(
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
        inbox = self._inbox if self._inbox is not None else self._start()
        with self._lock:
            self._pending[completion_id] = threading.Event()
            self._in_flight[record.model] += 1
        try:
            inbox.put_nowait(record)  # pickled and sent by the queue's own feeder thread
        except queue.Full:
            self._reported(completion_id, record.model, None, None)
            self.metrics.traces_dropped.labels(record.model, "buffer_full").inc()

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

    def _start(self) -> Any:
        with self._lock:
            if self._inbox is None and not self._closed:
                self._outbox = self._ctx.Queue()
                inbox = self._ctx.Queue(self.settings.buffer_size)
                self._writer = self._ctx.Process(
                    target=write_traces,
                    args=(self.tracking_uri, self.settings.experiment, inbox, self._outbox),
                    name="tuneops-capture",
                    daemon=True,
                )
                self._writer.start()
                self._collector = threading.Thread(target=self._collect, name="tuneops-capture", daemon=True)
                self._collector.start()
                self._inbox = inbox
        return self._inbox

    def _collect(self) -> None:
        """Take the writer's reports: metrics, completion id -> trace id, and wake feedback waiting on them."""
        outbox, writer = self._outbox, self._writer
        while True:
            try:
                report: Written | None = outbox.get(timeout=1.0)
            except queue.Empty:
                if not writer.is_alive() and not self._closed:
                    self._writer_died()
                    return
                continue
            if report is None:
                return
            completion_id, model, trace_id, error = report
            if trace_id is not None:
                self.metrics.traces_written.labels(model).inc()
            else:
                self.metrics.traces_dropped.labels(model, "write_failed").inc()
                now = time.monotonic()
                if now - self._warned > WARN_EVERY_S:
                    self._warned = now
                    log.warning("traffic capture: writing a trace to %s failed: %s", self.tracking_uri, error)
            self._reported(completion_id, model, trace_id, error)

    def _writer_died(self) -> None:
        """The writer process ended by itself (killed, crashed): its records are lost; the next record restarts it."""
        log.error("traffic capture: the writer process exited (code %s); starting another", self._writer.exitcode)
        with self._lock:
            inbox, self._inbox = self._inbox, None
            lost, self._in_flight = +self._in_flight, collections.Counter()
            pending, self._pending = self._pending, {}
        for model, count in lost.items():
            self.metrics.traces_dropped.labels(model, "write_failed").inc(count)
        for event in pending.values():
            event.set()
        inbox.cancel_join_thread()
        inbox.close()

    def _reported(self, completion_id: str, model: str, trace_id: str | None, error: str | None) -> None:
        with self._lock:
            self._in_flight[model] -= 1
            if trace_id is not None:
                self._written[completion_id] = trace_id
                while len(self._written) > REMEMBERED:
                    self._written.popitem(last=False)
            event = self._pending.pop(completion_id, None)
        if event is not None:
            event.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records; let the writer finish what is queued for up to `timeout_s`, then stop it.

        What it had not written by then is counted as dropped (reason `shutdown`).
        """
        self._closed = True
        self.feedback_pool.shutdown(wait=False, cancel_futures=True)
        if self._inbox is None:
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._inbox.put(None, timeout=timeout_s)
        self._writer.join(max(0.0, deadline - time.monotonic()))
        if self._writer.is_alive():
            self._writer.terminate()
            self._writer.join(5)
        self._outbox.put(None)
        if self._collector is not None:
            self._collector.join(5)
        lost = +self._in_flight
        if lost:
            log.warning("traffic capture: %d traces not written at shutdown", sum(lost.values()))
            for model, count in lost.items():
                self.metrics.traces_dropped.labels(model, "shutdown").inc(count)
        self._inbox.cancel_join_thread()  # records the writer never took are dropped, not awaited at exit
        self._inbox.close()
        self._outbox.close()


def write_traces(tracking_uri: str, template: str, inbox: Any, outbox: Any) -> None:
    """The writer process: mask and write each record until None arrives; report each outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the gateway, which stops this
    from mlflow import MlflowClient

    experiments: dict[str, str] = {}
    while True:
        record: Capture | None = inbox.get()
        if record is None:
            return
        try:
            experiment = experiments.get(record.model)
            if experiment is None:
                name = traffic_experiment(record.model, template)
                experiment = experiments[record.model] = experiment_id(MlflowClient(tracking_uri), name)
            report: Written = (
                record.request_id,
                record.model,
                write_trace(tracking_uri, experiment, _masked(record)),
                None,
            )
        except Exception as exc:  # a down or refusing tracking server: reported, counted, the gateway serves on
            report = (record.request_id, record.model, None, f"{type(exc).__name__}: {exc}")
        outbox.put(report)


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
