"""Continuous batching over one base model with many LoRA adapters.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`)? It packs every
request into one ragged row (`input_ids` of shape `[1, total_tokens]`) over a paged cache, while peft mixes
adapters per batch *row* (`adapter_names=[...]`, one name per row). Packed requests therefore cannot each
use their own adapter, so two versions (or a promotion in flight) could not share a batch. This scheduler
is the compact alternative: a background thread runs a decode loop over a left-padded batch with a KV cache
(`KVBatch`); between steps finished or abandoned rows leave and queued requests are prefilled together and
join. Each row names its adapter; a batch whose rows all use one adapter runs without the per-row split.
It runs on CPU (bf16 where `core.device` chooses it) and CUDA alike.

One request can never fail or change another: its parameters are checked on submission, sampling cannot
raise for any parameter value, a row whose adapter yields non-finite logits fails alone, a prefill that
raises fails only its own requests (each retried alone first), and a prefill step pads at most
`max_prefill_tokens` tokens (one longer prompt runs alone), so a long prompt delays the running rows once.
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
from serve.errors import APIError, EngineFailure, InvalidRequest, NotReady, QueueFull, QueueTimeout
from serve.kv_batch import KVBatch
from serve.metrics import Metrics
from serve.sampling import BROKEN, is_greedy, make_generator, sample

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

    def __init__(
        self,
        *,
        max_batch: int,
        max_queue: int,
        queue_timeout_s: float,
        metrics: Metrics,
        max_prefill_tokens: int = 4096,
    ) -> None:
        self.base: Any = None
        self.model: Any = None  # the PeftModel, created with the first adapter
        self.tokenizer: Any = None
        self.vocab_size: int | None = None  # rows of the input embedding: the valid prompt token ids
        self.device = torch.device("cpu")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics
        # Decode steps by the number of distinct adapters in them: 2 or more shows versions sharing a batch.
        self.decode_steps_by_adapters: collections.Counter[int] = collections.Counter()
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
        self.vocab_size = int(base.get_input_embeddings().num_embeddings)

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
        with self._cv:  # submissions append to the queue from other threads
            queued = any(j.adapter == name for j in self._waiting)
        if queued or any(r.job.adapter == name for r in self._rows):
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
        self._check(job)
        with self._cv:
            if not self.accepting or self._stopping:
                raise NotReady("the gateway is shutting down")
            if len(self._waiting) >= self.max_queue and self._busy_rows() + job.params.n > self.max_batch:
                raise QueueFull(retry_after_s)
            self._waiting.append(job)
            self._cv.notify_all()

    def _busy_rows(self) -> int:
        return len(self._rows) + sum(j.params.n for j in self._waiting)

    def _check(self, job: Job) -> None:
        """Refuse a job that could never run or would break its batch (the API checks these first)."""
        params = job.params
        if not 1 <= params.n <= self.max_batch:
            raise InvalidRequest(f"'n' must be between 1 and {self.max_batch} (the batch size).", param="n")
        if params.max_tokens < 1:
            raise InvalidRequest("'max_tokens' must be at least 1.", param="max_tokens")
        if not job.prompt_ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        vocab = self.vocab_size
        if vocab is not None and (min(job.prompt_ids) < 0 or max(job.prompt_ids) >= vocab):
            raise InvalidRequest("The prompt holds a token id outside the vocabulary.", param="prompt")

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
            # Calls run before admission: a call that unloads an adapter sees every job that will use it
            # (queued or running), and admission then sees every adapter the calls removed.
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # reported to the caller, who decides
                        future.set_exception(exc)
            with self._cv:
                self._expire()
                joiners = self._admit() if self.model is not None else []
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    if joiners:
                        self._join(joiners)
                    if self._rows:
                        self._decode()
            except Exception as exc:  # a failed step fails its rows, never the gateway
                log.exception("generation step failed")
                error = EngineFailure(f"generation failed: {type(exc).__name__}")
                failed = {id(r.job): r.job for r in self._rows}
                failed.update({id(j): j for j in joiners})
                for job in failed.values():
                    self._abort(job, error)
                self._rows, self._batch = [], None
        for _fn, future in self._calls:
            future.cancel()
        for job in list(self._waiting) + list({id(r.job): r.job for r in self._rows}.values()):
            self._fail(job, NotReady("the gateway stopped"))
        self._waiting.clear()
        self._rows, self._batch = [], None

    def _fail(self, job: Job, error: APIError) -> None:
        self.metrics.request_errors.labels(*job.labels, error.code or error.type).inc()
        self._send(job, Failed(error))

    def _abort(self, job: Job, error: APIError) -> None:
        """Fail a job still in the batch; its other choices leave at the next step (a gone client: no event)."""
        if not job.cancelled:
            job.cancelled = True
            self._fail(job, error)

    def _send(self, job: Job, event: Event) -> None:
        """Deliver one event; a sink that raises takes only its own job out of the batch."""
        try:
            job.sink(event)
        except Exception:
            log.exception("an event could not be delivered; the request leaves the batch")
            job.cancelled = True

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting and now - self._waiting[0].arrived > self.queue_timeout_s:
            job = self._waiting.popleft()
            if not job.cancelled:
                self._fail(job, QueueTimeout(self.queue_timeout_s))

    def _admit(self) -> list[Job]:
        """The next prefill group: queued jobs in arrival order while their rows fit the batch and their
        prompts, padded to the longest, fit `max_prefill_tokens` (a longer prompt is admitted alone)."""
        joiners: list[Job] = []
        rows = len(self._rows)
        width = 0
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if job.adapter not in self.model.peft_config:  # unloaded between lookup and submit
                self._waiting.popleft()
                self._fail(job, NotReady("The requested version was just unloaded; retry.", retry_after_s=1))
                continue
            padded = max(width, len(job.prompt_ids))
            if rows + job.params.n > self.max_batch or (
                joiners and padded * (len(joiners) + 1) > self.max_prefill_tokens
            ):
                break
            self._waiting.popleft()
            joiners.append(job)
            rows += job.params.n
            width = padded
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

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` and add their rows. A prefill that raises leaves the running batch as it was and
        fails only its own jobs; several are retried one by one first, so only the culprit fails."""
        try:
            new, logits = self._prefill(jobs)
        except Exception as exc:
            if len(jobs) > 1:
                log.warning("a prefill of %d requests failed (%s); retrying each alone", len(jobs), exc)
                for job in jobs:
                    self._join([job])
                return
            log.exception("prefill failed")
            self._abort(jobs[0], EngineFailure(f"generation failed: {type(exc).__name__}"))
            return
        self._add_rows(jobs, new, logits)

    def _prefill(self, jobs: list[Job]) -> tuple[KVBatch, torch.Tensor]:
        """The jobs' prompts through the model: their cache (one row per choice) and next-token logits."""
        from transformers import DynamicCache

        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=self.device
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [j.adapter for j in jobs], logits_to_keep=1)
        expand = [i for i, j in enumerate(jobs) for _ in range(j.params.n)]
        new = KVBatch(cache, mask).select(expand) if expand != list(range(len(jobs))) else KVBatch(cache, mask)
        return new, logits.index_select(0, torch.tensor(expand, device=logits.device))

    def _add_rows(self, jobs: list[Job], new: KVBatch, logits: torch.Tensor) -> None:
        now = time.monotonic()
        rows = []
        for job in jobs:
            self.metrics.request_queue_time.labels(*job.labels).observe(now - job.arrived)
            self.metrics.prompt_tokens.labels(*job.labels).inc(len(job.prompt_ids))
            params = job.params
            for k in range(params.n):
                seed = None if params.seed is None else params.seed + k
                gen = None if is_greedy(params.temperature) else make_generator(seed, logits.device)
                rows.append(Row(job, job.choice_offset + k, Detokenizer(self.tokenizer, list(params.stop)), gen))
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
        adapters = [r.job.adapter for r in self._rows]
        self.decode_steps_by_adapters[len(set(adapters))] += 1
        logits = self._forward(ids, mask, positions, batch.cache, adapters)
        self._emit(logits, list(range(len(self._rows))))

    def _emit(self, logits: torch.Tensor, which: list[int]) -> None:
        """Sample the next token of rows `which` (logits row i belongs to row which[i]), stream and finish.

        Each row is handled on its own: a row that goes wrong fails its own job, never the step.
        """
        rows = [self._rows[i] for i in which]
        tokens = sample(
            logits,
            [r.job.params.temperature for r in rows],
            [r.job.params.top_p for r in rows],
            [r.generator for r in rows],
        )
        now = time.monotonic()
        done: set[int] = set()
        for pos, row, token in zip(which, rows, tokens, strict=True):
            try:
                self._advance(pos, row, token, now, done)
            except Exception as exc:
                log.exception("a row failed; its request fails alone")
                self._abort(row.job, EngineFailure(f"generation failed: {type(exc).__name__}"))
                done.add(pos)
        if done:
            self._retain([i for i in range(len(self._rows)) if i not in done])

    def _advance(self, pos: int, row: Row, token: int, now: float, done: set[int]) -> None:
        """Row `pos` takes `token`: stream its text, and add `pos` to `done` when the row leaves the batch."""
        job = row.job
        labels = job.labels
        if token == BROKEN:
            self._abort(job, EngineFailure("the model produced non-finite logits"))  # its other choices leave too
            done.add(pos)
            return
        if job.cancelled:
            self.metrics.generation_tokens.labels(*labels).inc(row.count)
            done.add(pos)
            return
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
                self._send(job, TextDelta(row.index, text))
            if stopped:
                reason = "stop"
            elif row.count >= job.params.max_tokens:
                reason = "length"
        if reason is not None:
            done.add(pos)
            self.metrics.generation_tokens.labels(*labels).inc(row.count)
            self._send(job, Finished(row.index, reason, row.count, row.detok.flush()))
            if all(r.job is not job or i in done for i, r in enumerate(self._rows)):
                self.metrics.request_success.labels(*labels, reason).inc()
                self.metrics.e2e_request_latency.labels(*labels).observe(now - job.arrived)
