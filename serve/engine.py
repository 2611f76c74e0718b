"""Continuous batching over one base model serving many LoRA versions.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`)? It packs every
request into one ragged row over a paged cache, so rows cannot each carry their own adapter, and it shares one
sampling configuration and one random generator across requests (no per-request `seed`, `n` or `top_p`). This
scheduler keeps what it does well and adds what the gateway needs:
- The KV cache lives in preallocated slots written in place (`kv_slots.SlotCache`): a decode step appends one
  column and attends over a view; rows join and leave between steps without copying the batch.
- The busiest version is merged into the base weights and the others are corrected on their own rows
  (`lora.LoraSet`): one version costs what the base costs, and two versions still share every step.
- A background thread runs the loop; between steps finished or abandoned rows leave, and queued requests are
  prefilled together straight into free slots, then join.
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

from core.errors import ModelError
from core.packed_linear import pack_linears
from serve.detokenizer import Detokenizer
from serve.errors import APIError, EngineFailure, InvalidRequest, NotReady, QueueFull, QueueTimeout
from serve.kv_slots import SlotCache
from serve.lora import LoraSet
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
        merge_switch_after: int = 32,
        pack_weights: bool = True,
    ) -> None:
        self.base: Any = None
        self.lora: LoraSet | None = None  # the adapters, created with the base
        self.tokenizer: Any = None
        self.vocab_size: int | None = None  # rows of the input embedding: the valid prompt token ids
        self.device = torch.device("cpu")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics
        self.merge_switch_after = merge_switch_after
        self.pack_weights = pack_weights
        # Decode steps by the number of distinct adapters in them: 2 or more shows versions sharing a batch.
        self.decode_steps_by_adapters: collections.Counter[int] = collections.Counter()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._rows: list[Row] = []  # row i owns slot i of the cache
        self._cache: SlotCache | None = None
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
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"} or getattr(config, "sliding_window", None):
            raise ModelError(f"the gateway serves full-attention models; this base has {sorted(kinds)} layers")
        self.base, self.tokenizer, self.device = base, tokenizer, device
        self.vocab_size = int(base.get_input_embeddings().num_embeddings)
        if self.pack_weights and (packed := pack_linears(base)):
            log.info("linear layers on packed weights: %d (bf16 on CPU)", packed)
        self.lora = LoraSet(base, switch_after=self.merge_switch_after)
        positions = int(getattr(config, "max_position_embeddings", 4096) or 4096)
        # Rows share columns, so a batch may span up to twice the longest sequence (padding included).
        self._cache = SlotCache(int(config.num_hidden_layers), self.max_batch, device, 2 * positions)

    @property
    def adapters(self) -> set[str]:
        return set(self.lora.adapters) if self.lora is not None else set()

    def add_adapter(self, name: str, path: Path) -> None:
        if self.lora is None:
            raise ModelError("load the base model before its adapters")
        self.lora.add(name, path)

    def remove_adapter(self, name: str) -> bool:
        """Unload an adapter no queued or running request uses."""
        if self.lora is None or name not in self.lora.adapters:
            return False
        with self._cv:  # submissions append to the queue from other threads
            queued = any(j.adapter == name for j in self._waiting)
        if queued or any(r.job.adapter == name for r in self._rows):
            return False
        self.lora.remove(name)
        return True

    def probe(self, adapter: str, prompt_ids: list[int], count: int) -> list[int]:
        """`count` greedy tokens of one adapter without the cache (engine thread only): a version's warm-up.

        Non-finite logits (NaN weights) raise: such a version must not serve.
        """
        assert self.lora is not None
        ids = torch.tensor([prompt_ids], device=self.device)
        out: list[int] = []
        with torch.inference_mode():
            for _ in range(count):
                self.lora.plan([adapter], count=False)
                try:
                    logits = self.base(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
                finally:
                    self.lora.clear()
                if not bool(torch.isfinite(logits).all()):
                    raise ModelError("the warm-up generation produced non-finite logits")
                token = int(logits.argmax())
                out.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        return out

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
                while not (self._stopping or self._calls or self._rows or (self._waiting and self.lora is not None)):
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
                joiners = self._admit() if self.lora is not None else []
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
                self._reset_rows()
        for _fn, future in self._calls:
            future.cancel()
        for job in list(self._waiting) + list({id(r.job): r.job for r in self._rows}.values()):
            self._fail(job, NotReady("the gateway stopped"))
        self._waiting.clear()
        self._reset_rows()

    def _reset_rows(self) -> None:
        self._rows = []
        if self._cache is not None:
            self._cache.abandon_prefill()
            self._cache.remove(list(range(self._cache.rows)))

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
            if job.adapter not in self.adapters:  # unloaded between lookup and submit
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
        assert self._cache is not None
        leaving = sorted(set(range(len(self._rows))) - set(keep))
        order = self._cache.remove(leaving)
        self._rows = [self._rows[i] for i in order]

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, adapters: list[str]
    ) -> Any:
        """One forward pass through the slots; each row on its own version. Returns last-position logits."""
        assert self.lora is not None
        self.lora.plan(adapters)
        try:
            out = self.base(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg(): self._cache},
            )
        finally:
            self.lora.clear()
        return out.logits[:, -1, :]

    def _cache_arg(self) -> str:
        """transformers renamed `past_key_values` to `cache` (5.2x); accept either."""
        if not hasattr(self, "_cache_name"):
            import inspect

            params = inspect.signature(self.base.forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return self._cache_name

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` into free slots and add their rows. A prefill that raises leaves the running batch as
        it was and fails only its own jobs; several are retried one by one first, so only the culprit fails."""
        try:
            logits = self._prefill(jobs)
        except Exception as exc:
            if len(jobs) > 1:
                log.warning("a prefill of %d requests failed (%s); retrying each alone", len(jobs), exc)
                for job in jobs:
                    self._join([job])
                return
            log.exception("prefill failed")
            self._abort(jobs[0], EngineFailure(f"generation failed: {type(exc).__name__}"))
            return
        self._add_rows(jobs, logits)

    def _prefill(self, jobs: list[Job]) -> torch.Tensor:
        """The jobs' prompts through the model into slots `rows ..`, one per job; their next-token logits."""
        cache = self._cache
        assert cache is not None
        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        real = torch.tensor(
            [[False] * (width - len(j.prompt_ids)) + [True] * len(j.prompt_ids) for j in jobs], device=self.device
        )
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        mask = cache.begin_prefill(len(jobs), width, real)
        try:
            logits = self._forward(ids, mask, positions, [j.adapter for j in jobs])
        except BaseException:
            cache.abandon_prefill()
            raise
        cache.end_prefill()
        return logits

    def _add_rows(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Rows for every choice: the first of job j is slot `first + j`; other choices copy its slot."""
        cache = self._cache
        assert cache is not None
        now = time.monotonic()
        first = len(self._rows)
        rows: list[Row] = []
        extra: list[tuple[int, Row]] = []
        for j, job in enumerate(jobs):
            self.metrics.request_queue_time.labels(*job.labels).observe(now - job.arrived)
            self.metrics.prompt_tokens.labels(*job.labels).inc(len(job.prompt_ids))
            params = job.params
            for k in range(params.n):
                seed = None if params.seed is None else params.seed + k
                gen = None if is_greedy(params.temperature) else make_generator(seed, logits.device)
                row = Row(job, job.choice_offset + k, Detokenizer(self.tokenizer, list(params.stop)), gen)
                if k == 0:
                    rows.append(row)
                else:
                    extra.append((j, row))
        for j, row in extra:
            cache.duplicate(first + j)
            rows.append(row)
        self._rows.extend(rows)
        source = list(range(len(jobs))) + [j for j, _ in extra]
        if source != list(range(len(jobs))):
            logits = logits.index_select(0, torch.tensor(source, device=logits.device))
        self._emit(logits, list(range(first, len(self._rows))))

    def _decode(self) -> None:
        cache = self._cache
        assert cache is not None
        ids = torch.tensor([[r.last] for r in self._rows], device=self.device)
        mask, positions = cache.decode_inputs()
        adapters = [r.job.adapter for r in self._rows]
        self.decode_steps_by_adapters[len(set(adapters))] += 1
        logits = self._forward(ids, mask, positions, adapters)
        cache.end_decode()
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
