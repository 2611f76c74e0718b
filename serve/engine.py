"""Continuous batching over one base model with many LoRA adapters.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`)? It packs every
request into one ragged row (`input_ids` of shape `[1, total_tokens]`) over a paged cache, while peft mixes
adapters per batch *row* (`adapter_names=[...]`, one name per row). Packed requests therefore cannot each
use their own adapter, so two versions (or a promotion in flight) could not share a batch. This scheduler
is the compact alternative: a background thread runs a decode loop over a left-padded batch with a KV cache
(`KVBatch`); between steps finished or abandoned rows leave and queued requests are prefilled together and
join. Each row names its adapter; a batch whose rows all use one adapter runs without the per-row split.
It runs on CPU (bf16 where `core.device` chooses it) and CUDA alike.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serve.detokenizer import Detokenizer
from serve.errors import APIError, EngineFailure, NotReady, QueueFull, QueueTimeout
from serve.kv_batch import KVBatch
from serve.metrics import Metrics
from serve.sampling import BROKEN, make_generator, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1


@dataclass(frozen=True)
class TextDelta:
    """New text of choice `index` (the engine's event; the OpenAI chunk's `delta` is `protocol.Delta`)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" or "length"
    completion_tokens: int
    text: str  # what remained unsent


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = TextDelta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One prompt with `n` choices on one loaded adapter; events go to `sink` from the engine thread."""

    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    sink: Callable[[Event], None]
    labels: tuple[str, str] = ("", "")  # model, version
    choice_offset: int = 0
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    first_token_at: float | None = None


@dataclass(eq=False)
class Row:
    job: Job
    index: int
    detok: Detokenizer
    generator: torch.Generator | None
    last: int = 0
    count: int = 0
    last_at: float = 0.0


class Engine:
    """Owns the model on its own thread; requests arrive through `submit`, everything else through `call`."""

    def __init__(self, *, max_batch: int, max_queue: int, queue_timeout_s: float, metrics: Metrics) -> None:
        self.base: Any = None
        self.model: Any = None  # the PeftModel, created with the first adapter
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._rows: list[Row] = []
        self._batch: KVBatch | None = None
        self._active: str | None = None
        self._stopping = False
        self.accepting = True
        self._thread = threading.Thread(target=self._loop, name="tuneops-engine", daemon=True)
        metrics.num_requests_running.set_function(lambda: len({id(r.job) for r in self._rows}))
        metrics.num_requests_waiting.set_function(lambda: len(self._waiting))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between decode steps.

        The engine thread is the only one that touches the model: loading, adapter changes and generation.
        That removes locking, and on CPU it keeps one OpenMP thread team; two teams (one per Python thread)
        spinning on a few cores made decode steps 40x slower here.
        """
        future: Future = Future()
        with self._cv:
            if self._stopping:
                raise NotReady("the gateway stopped")
            self._calls.append((fn, future))
            self._cv.notify_all()
        return future

    # adapters (engine thread only) ----------------------------------------------------------------

    def load_base(self, base: Any, tokenizer: Any, device: torch.device) -> None:
        self.base, self.tokenizer, self.device = base, tokenizer, device

    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name, autocast_adapter_dtype=False)
        else:
            self.model.load_adapter(path, adapter_name=name, autocast_adapter_dtype=False)
        self.model.to(dtype=self.base.dtype, device=self.device)
        self.model.eval()
        self._active = None

    def remove_adapter(self, name: str) -> bool:
        """Unload an adapter nothing uses; the last one stays (it holds the PeftModel)."""
        if self.model is None or name not in self.model.peft_config or len(self.model.peft_config) == 1:
            return False
        if any(r.job.adapter == name for r in self._rows) or any(j.adapter == name for j in self._waiting):
            return False
        self.model.delete_adapter(name)
        self._active = None
        return True

    # requests -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job, retry_after_s: int) -> None:
        with self._cv:
            if not self.accepting or self._stopping:
                raise NotReady("the gateway is shutting down")
            if len(self._waiting) >= self.max_queue and self._busy_rows() + job.params.n > self.max_batch:
                raise QueueFull(retry_after_s)
            self._waiting.append(job)
            self._cv.notify_all()

    def _busy_rows(self) -> int:
        return len(self._rows) + sum(j.params.n for j in self._waiting)

    # the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._calls or self._rows or (self._waiting and self.model is not None)):
                    self._cv.wait(0.5)
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
                self._expire()
                joiners = self._admit() if self.model is not None else []
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # reported to the caller, who decides
                        future.set_exception(exc)
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    if joiners:
                        self._prefill(joiners)
                    if self._rows:
                        self._decode()
            except Exception as exc:  # a failed step fails its rows, never the gateway
                log.exception("generation step failed")
                error = EngineFailure(f"generation failed: {type(exc).__name__}")
                failed = {id(r.job): r.job for r in self._rows}
                failed.update({id(j): j for j in joiners})
                for job in failed.values():
                    self._fail(job, error)
                self._rows, self._batch = [], None
        for _fn, future in self._calls:
            future.cancel()
        for job in list(self._waiting) + list({id(r.job): r.job for r in self._rows}.values()):
            self._fail(job, NotReady("the gateway stopped"))
        self._waiting.clear()
        self._rows, self._batch = [], None

    def _fail(self, job: Job, error: APIError) -> None:
        self.metrics.request_errors.labels(*job.labels, error.code or error.type).inc()
        job.sink(Failed(error))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting and now - self._waiting[0].arrived > self.queue_timeout_s:
            job = self._waiting.popleft()
            if not job.cancelled:
                self._fail(job, QueueTimeout(self.queue_timeout_s))

    def _admit(self) -> list[Job]:
        joiners: list[Job] = []
        rows = len(self._rows)
        while self._waiting and rows + self._waiting[0].params.n <= self.max_batch:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            if job.adapter not in self.model.peft_config:  # unloaded between lookup and submit
                self._fail(job, NotReady("The requested version was just unloaded; retry.", retry_after_s=1))
                continue
            joiners.append(job)
            rows += job.params.n
        return joiners

    def _drop_cancelled(self) -> None:
        """Rows of abandoned requests (client gone) leave the batch; their tokens still count as generated."""
        for row in self._rows:
            if row.job.cancelled:
                self.metrics.generation_tokens.labels(*row.job.labels).inc(row.count)
        keep = [i for i, r in enumerate(self._rows) if not r.job.cancelled]
        if len(keep) != len(self._rows):
            self._retain(keep)

    def _retain(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(keep)

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        adapters: list[str],
        **kwargs: Any,
    ) -> torch.Tensor:
        """One forward pass; rows of one adapter skip peft's per-row split and its per-call hook setup."""
        if len(set(adapters)) == 1:
            if self._active != adapters[0]:
                self.model.set_adapter(adapters[0])
                self._active = adapters[0]
            model = self.model.get_base_model()  # LoRA layers in place, active adapter set
        else:
            model = self.model
            kwargs["adapter_names"] = adapters
        kwargs[self._cache_arg()] = cache
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    def _cache_arg(self) -> str:
        """transformers renamed `past_key_values` to `cache` (5.2x); accept either."""
        if not hasattr(self, "_cache_name"):
            import inspect

            params = inspect.signature(self.base.forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return self._cache_name

    def _prefill(self, jobs: list[Job]) -> None:
        from transformers import DynamicCache

        now = time.monotonic()
        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=self.device
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        for job in jobs:
            self.metrics.request_queue_time.labels(*job.labels).observe(now - job.arrived)
            self.metrics.prompt_tokens.labels(*job.labels).inc(len(job.prompt_ids))
        logits = self._forward(ids, mask, positions, cache, [j.adapter for j in jobs], logits_to_keep=1)
        expand = [i for i, j in enumerate(jobs) for _ in range(j.params.n)]
        new = KVBatch(cache, mask).select(expand) if expand != list(range(len(jobs))) else KVBatch(cache, mask)
        logits = logits.index_select(0, torch.tensor(expand, device=logits.device))
        rows = []
        for job in jobs:
            for k in range(job.params.n):
                seed = None if job.params.seed is None else job.params.seed + k
                gen = make_generator(seed, logits.device) if job.params.temperature > 0 else None
                rows.append(Row(job, job.choice_offset + k, Detokenizer(self.tokenizer, list(job.params.stop)), gen))
        self._batch = new if self._batch is None else KVBatch.concat(self._batch, new)
        first = len(self._rows)
        self._rows.extend(rows)
        self._emit(logits, list(range(first, len(self._rows))))

    def _decode(self) -> None:
        assert self._batch is not None
        batch = self._batch
        ids = torch.tensor([[r.last] for r in self._rows], device=self.device)
        positions = batch.positions()
        mask = batch.grow_mask()
        logits = self._forward(ids, mask, positions, batch.cache, [r.job.adapter for r in self._rows])
        self._emit(logits, list(range(len(self._rows))))

    def _emit(self, logits: torch.Tensor, which: list[int]) -> None:
        """Sample the next token of rows `which` (logits row i belongs to row which[i]), stream and finish."""
        rows = [self._rows[i] for i in which]
        tokens = sample(
            logits,
            [r.job.params.temperature for r in rows],
            [r.job.params.top_p for r in rows],
            [r.generator for r in rows],
        )
        now = time.monotonic()
        done: set[int] = set()
        for pos, (row, token) in zip(which, zip(rows, tokens, strict=True), strict=True):
            job = row.job
            labels = job.labels
            if token == BROKEN:
                if not job.cancelled:
                    job.cancelled = True  # its other choices leave the batch too
                    self._fail(job, EngineFailure("the model produced non-finite logits"))
                done.add(pos)
                continue
            if job.cancelled:
                self.metrics.generation_tokens.labels(*labels).inc(row.count)
                done.add(pos)
                continue
            if row.count == 0:
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.metrics.time_to_first_token.labels(*labels).observe(now - job.arrived)
            else:
                self.metrics.inter_token_latency.labels(*labels).observe(now - row.last_at)
            row.last_at = now
            row.last = token
            row.count += 1
            reason = None
            if token in job.eos_ids:
                reason = "stop"
            else:
                text, stopped = row.detok.add(token)
                if text:
                    job.sink(TextDelta(row.index, text))
                if stopped:
                    reason = "stop"
                elif row.count >= job.params.max_tokens:
                    reason = "length"
            if reason is not None:
                done.add(pos)
                self.metrics.generation_tokens.labels(*labels).inc(row.count)
                job.sink(Finished(row.index, reason, row.count, row.detok.flush()))
                if all(r.job is not job or i in done for i, r in enumerate(self._rows)):
                    self.metrics.request_success.labels(*labels, reason).inc()
                    self.metrics.e2e_request_latency.labels(*labels).observe(now - job.arrived)
        if done:
            self._retain([i for i in range(len(self._rows)) if i not in done])
