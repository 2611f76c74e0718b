"""OpenAI chat and text completions on the engine: validate, admit, generate, shape the answer or stream.

Everything a request can get wrong is checked before any work (unsupported parameters, limits, context
length). A streamed request that fails after its headers were sent ends with an SSE error event. When the
client goes away, its rows leave the batch at the next step. Parsing, templating and tokenizing a body (up to
about a second each for 1 MiB) run on a small thread pool, never on the event loop, so one huge request cannot stall
other requests or the probes.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

from core.chat import prompt_ids
from core.registry import Manifest
from serve import protocol as p
from serve.engine import Engine, Event, Failed, Finished, Job, SamplingParams, TextDelta
from serve.errors import APIError, ContextLengthExceeded, InvalidRequest, Unsupported, sse_event
from serve.settings import Limits
from serve.versions import Served, VersionDirectory

if TYPE_CHECKING:
    from serve.capture import TrafficCapture

log = logging.getLogger(__name__)

PREPARE_THREADS = 4  # per endpoint: requests templated at once, so one huge prompt leaves room for the others

# Fields OpenAI defines that this server cannot honour, with the value(s) that mean "not used".
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "service_tier": (None, "auto", "default"),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "store": (None, False),
}


@dataclass
class PreparedRequest:
    """A validated request, tokenized and resolved to a loaded version: what the engine needs to run it."""

    served: Served
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    ref: str = ""  # the model as the client named it
    content: Any = None  # chat messages or completion prompts as sent, for traffic capture
    arrived: float = field(default_factory=time.perf_counter)  # set by the route to the request's arrival
    arrived_at: float = field(default_factory=time.time)  # the same moment, epoch seconds
    api_key_label: str | None = None


@dataclass(frozen=True)
class StreamHead:
    """What every chunk of one stream repeats."""

    id: str
    created: int
    model: str
    include_usage: bool


class _NotJSON(ValueError):
    """A NaN or Infinity literal: Python's json reads them, JSON has no such values."""


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


def parse(model: type[p.Strict], raw: bytes) -> Any:
    """Body bytes -> request model; any problem is a 400 naming the offending parameter."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (_NotJSON, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except ValueError:  # int() refuses numbers longer than sys.get_int_max_str_digits()
        raise InvalidRequest(
            f"The request body holds a number with more than {sys.get_int_max_str_digits()} digits.",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        # Union members appear in the location as type names ("str", "list[int]"); the field itself never does.
        loc = [str(x) for i, x in enumerate(err["loc"]) if i == 0 or not _union_tag(str(x))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            ) from None
        if err["type"] == "missing":
            raise InvalidRequest(
                f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param) from None


def _union_tag(part: str) -> bool:
    return part.startswith(("str", "list[", "int", "function-"))


def unicode_text(text: str, param: str) -> str:
    """`text`, refused when it holds a lone surrogate: JSON can spell one ("\\ud800"), Unicode text cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{param}' is not valid Unicode text (it holds a lone surrogate).", param=param) from None
    return text


def refuse_unsupported(req: p.SamplingFields) -> None:
    for name in NEUTRAL:
        if name in type(req).model_fields and getattr(req, name) not in NEUTRAL[name]:
            raise Unsupported(name)
    fmt = getattr(req, "response_format", None)
    if fmt not in (None, {"type": "text"}):
        raise Unsupported("response_format", "other than {'type': 'text'} is not supported by this server")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")


def sampling(
    req: p.SamplingFields, limits: Limits, prompt_len: int, max_model_len: int, max_tokens: int | None
) -> SamplingParams:
    n = req.n or 1
    if n > limits.max_n:
        raise InvalidRequest(f"'n' may be at most {limits.max_n}.", param="n")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(f"'max_tokens' may be at most {limits.max_tokens}.", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise InvalidRequest(f"'stop' may hold at most {limits.max_stop} strings.", param="stop")
    room = max_model_len - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
            "completion). "
            "Please reduce the length of the messages or completion.",
            param="messages",
        )
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt has {prompt_len}.",
            param="messages",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        max_tokens=max_tokens or min(limits.default_max_tokens, room),
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=tuple(stop),
        seed=req.seed,
        n=n,
    )


def chat_messages(req: p.ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, msg in enumerate(req.messages):
        if msg.role in ("tool", "function"):
            raise Unsupported(f"messages[{i}].role", f"'{msg.role}' is not supported by this server")
        extra = set(msg.model_extra or {}) - {"name"}
        if extra:
            raise Unsupported(f"messages[{i}].{sorted(extra)[0]}")
        if isinstance(msg.content, list):
            texts = []
            for j, part in enumerate(msg.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise Unsupported(f"messages[{i}].content[{j}]", "is not a text part; only text is supported")
                texts.append(part["text"])
            content = "".join(texts)
        else:
            content = msg.content or ""
        out.append(
            {
                "role": "system" if msg.role == "developer" else msg.role,
                "content": unicode_text(content, f"messages[{i}].content"),
            }
        )
    return out


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], manifest: Manifest) -> list[int]:
    """The conversation through the version's chat template, as token ids (slow for long prompts)."""
    try:
        return prompt_ids(tokenizer, messages, manifest.chat_template, manifest.system_prompt)
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise InvalidRequest(
            f"The messages cannot be rendered with the model's chat template: {exc}", param="messages"
        ) from None


def completion_prompt_ids(tokenizer: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt as token ids (text is tokenized), all non-empty and inside the vocabulary."""
    vocab = len(tokenizer)
    ids = [
        list(x)
        if isinstance(x, list)
        else list(tokenizer(unicode_text(x, "prompt"), add_special_tokens=True)["input_ids"])
        for x in prompts
    ]
    if any(not x for x in ids):
        raise InvalidRequest("'prompt' must not be empty.", param="prompt")
    if any(t < 0 or t >= vocab for x in ids for t in x):
        raise InvalidRequest("'prompt' holds a token id outside the vocabulary.", param="prompt")
    return ids


R = TypeVar("R", bound=p.SamplingFields)
T = TypeVar("T")
P = ParamSpec("P")


class OpenAIServing(ABC, Generic[R]):
    """One OpenAI endpoint on the engine: admission, generation and the answer, whole or streamed.

    The shared flow lives here; `OpenAIServingChat` and `OpenAIServingCompletion` say how their request is
    prepared and how their bodies and chunks look.
    """

    request_type: ClassVar[type[p.SamplingFields]]
    id_prefix: ClassVar[str]
    endpoint: ClassVar[str]
    capture: TrafficCapture | None = None  # set by the gateway when traffic capture is on

    def __init__(self, engine: Engine, directory: VersionDirectory, limits: Limits, log_prompts: bool) -> None:
        self.engine = engine
        self.directory = directory
        self.limits = limits
        self.log_prompts = log_prompts
        # Threads start on first use and end when the pool is garbage collected with its gateway.
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix=f"tuneops-{self.id_prefix}")

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run CPU-bound request preparation off the event loop (keeping the request id for its log lines)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._prepare_pool, lambda: ctx.run(fn, *args, **kwargs)
        )

    @abstractmethod
    async def prepare(self, req: R) -> PreparedRequest:
        """Validate, resolve the model and tokenize; every refusal happens here, before any work."""

    @abstractmethod
    def response(
        self, name: str, texts: dict[int, str], reasons: dict[int, str], usage: p.Usage
    ) -> p.ChatCompletion | p.Completion:
        """The non-streamed body: one choice per finished index."""

    def opening(self, head: StreamHead, index: int) -> dict[str, Any] | None:
        """The chunk sent before choice `index`'s first text, if the protocol has one."""
        return None

    @abstractmethod
    def chunk(self, head: StreamHead, index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        """One streamed chunk: new text of choice `index`, or its finish reason."""

    @abstractmethod
    def usage_chunk(self, head: StreamHead, usage: p.Usage) -> p.ChatCompletionChunk | p.Completion:
        """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""

    async def served(self, model: str) -> Served:
        found = self.directory.lookup(model)
        return found if found is not None else await asyncio.to_thread(self.directory.resolve, model)

    def submit(self, prep: PreparedRequest) -> tuple[asyncio.Queue[Event], list[Job]]:
        """Queue one job per prompt; their events arrive on one asyncio queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        jobs = []
        try:
            for i, ids in enumerate(prep.prompts):
                job = Job(
                    prep.served.adapter,
                    ids,
                    prep.params,
                    prep.served.eos_ids,
                    sink,
                    prep.served.labels,
                    choice_offset=i * prep.params.n,
                )
                self.engine.submit(job, self.limits.retry_after_s)
                jobs.append(job)
        except APIError:
            for job in jobs:
                job.cancelled = True
            raise
        return queue, jobs

    async def events(
        self, queue: asyncio.Queue[Event], jobs: list[Job], disconnected: Callable[[], Any] | None = None
    ) -> AsyncIterator[TextDelta | Finished]:
        """Engine events until every choice finished; cancels the jobs if the consumer stops early."""
        remaining = sum(j.params.n for j in jobs)
        checked = time.monotonic()
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    event = None
                if disconnected is not None and time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await disconnected():
                        log.info("client disconnected; generation stopped")
                        return
                if event is None:
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    remaining -= 1
                yield event
        finally:
            for job in jobs:
                job.cancelled = True

    async def complete(
        self, prep: PreparedRequest, name: str, disconnected: Callable[[], Any]
    ) -> p.ChatCompletion | p.Completion:
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        tokens = 0
        first: float | None = None
        try:
            queue, jobs = self.submit(prep)
            async for event in self.events(queue, jobs, disconnected):
                first = first or time.perf_counter()
                texts[event.index] = texts.get(event.index, "") + event.text
                if isinstance(event, Finished):
                    reasons[event.index] = event.reason
                    tokens += event.completion_tokens
        except Exception as exc:
            self._captured(prep, p._id(self.id_prefix), texts, reasons, tokens, first, exc)
            raise
        body = self.response(name, texts, reasons, self.usage(prep, tokens))
        self._captured(prep, body.id, texts, reasons, tokens, first, self._abandoned(prep, jobs, reasons))
        return body

    def _captured(
        self,
        prep: PreparedRequest,
        completion_id: str,
        texts: dict[int, str],
        reasons: dict[int, str],
        tokens: int,
        first: float | None,
        error: BaseException | None,
    ) -> None:
        if self.capture is not None:
            self.capture.finished(prep, self.endpoint, completion_id, texts, reasons, tokens, first, error)

    @staticmethod
    def _abandoned(prep: PreparedRequest, jobs: list[Job], reasons: dict[int, str]) -> APIError | None:
        """The error a request records when its client left before every choice finished."""
        if len(reasons) >= len(jobs) * prep.params.n:
            return None
        error = APIError("The client disconnected before the answer was complete.", code="client_disconnected")
        error.status = 499
        return error

    @staticmethod
    def usage(prep: PreparedRequest, completion_tokens: int) -> p.Usage:
        prompt = sum(len(x) for x in prep.prompts)
        return p.Usage(
            prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
        )

    def stream(self, prep: PreparedRequest, name: str) -> AsyncIterator[str]:
        """SSE lines; admission errors are raised here, before the response starts."""
        head = StreamHead(p._id(self.id_prefix), int(time.time()), name, prep.include_usage)
        try:
            queue, jobs = self.submit(prep)
        except Exception as exc:
            self._captured(prep, head.id, {}, {}, 0, None, exc)
            raise
        return self._stream(prep, head, queue, jobs)

    async def _stream(
        self, prep: PreparedRequest, head: StreamHead, queue: asyncio.Queue[Event], jobs: list[Job]
    ) -> AsyncIterator[str]:
        def sse(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        started: set[int] = set()
        tokens = 0
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        first: float | None = None
        error: BaseException | None = None
        try:
            async for event in self.events(queue, jobs):
                first = first or time.perf_counter()
                texts[event.index] = texts.get(event.index, "") + event.text
                if event.index not in started:
                    started.add(event.index)
                    opening = self.opening(head, event.index)
                    if opening is not None:
                        yield sse(opening)
                if isinstance(event, TextDelta):
                    yield sse(self.chunk(head, event.index, event.text, None))
                elif isinstance(event, Finished):
                    tokens += event.completion_tokens
                    reasons[event.index] = event.reason
                    if event.text:
                        yield sse(self.chunk(head, event.index, event.text, None))
                    yield sse(self.chunk(head, event.index, None, event.reason))
            if prep.include_usage:
                yield f"data: {self.usage_chunk(head, self.usage(prep, tokens)).model_dump_json()}\n\n"
        except APIError as exc:
            error = exc
            yield sse_event(exc)
        except Exception as exc:  # never a stack trace on the wire
            log.exception("stream failed")
            error = APIError(f"The server had an error while streaming: {type(exc).__name__}")
            yield sse_event(error)
        finally:  # also when the client went away and the response was closed mid-stream
            self._captured(prep, head.id, texts, reasons, tokens, first, error or self._abandoned(prep, jobs, reasons))
        yield "data: [DONE]\n\n"


class OpenAIServingChat(OpenAIServing[p.ChatCompletionRequest]):
    """`/v1/chat/completions`: messages through the model's chat template; chunks carry a `delta`."""

    request_type = p.ChatCompletionRequest
    id_prefix = "chatcmpl"
    endpoint = "chat"

    async def prepare(self, req: p.ChatCompletionRequest) -> PreparedRequest:
        refuse_unsupported(req)
        messages = await self.offload(chat_messages, req)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise InvalidRequest(
                "Set 'max_tokens' or 'max_completion_tokens', not both.", param="max_completion_tokens"
            )
        served = await self.served(req.model)
        ids = await self.offload(chat_prompt_ids, self.directory.tokenizer, messages, served.manifest)
        params = sampling(
            req,
            self.limits,
            len(ids),
            self.directory.max_model_len,
            req.max_completion_tokens or req.max_tokens,
        )
        if self.log_prompts:
            log.info("prompt: %s", json.dumps(messages))
        return PreparedRequest(
            served,
            [ids],
            params,
            bool(req.stream),
            bool(req.stream_options and req.stream_options.include_usage),
            ref=req.model,
            content=messages,
        )

    def response(self, name: str, texts: dict[int, str], reasons: dict[int, str], usage: p.Usage) -> p.ChatCompletion:
        return p.ChatCompletion(
            model=name,
            usage=usage,
            choices=[
                p.ChatChoice(index=i, message=p.AssistantMessage(content=texts.get(i, "")), finish_reason=reasons[i])
                for i in sorted(reasons)
            ],
        )

    def _chunk(self, head: StreamHead, index: int, delta: p.Delta, reason: str | None) -> dict[str, Any]:
        choice = p.ChatChunkChoice(index=index, delta=delta, finish_reason=reason)
        return p.ChatCompletionChunk(id=head.id, created=head.created, model=head.model, choices=[choice]).model_dump()

    def opening(self, head: StreamHead, index: int) -> dict[str, Any]:
        return self._chunk(head, index, p.Delta(role="assistant", content=""), None)

    def chunk(self, head: StreamHead, index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        return self._chunk(head, index, p.Delta() if text is None else p.Delta(content=text), reason)

    def usage_chunk(self, head: StreamHead, usage: p.Usage) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=head.id, created=head.created, model=head.model, choices=[], usage=usage)


class OpenAIServingCompletion(OpenAIServing[p.CompletionRequest]):
    """`/v1/completions`: one or more raw prompts (text or token ids); chunks are partial `Completion`s."""

    request_type = p.CompletionRequest
    id_prefix = "cmpl"
    endpoint = "completions"

    async def prepare(self, req: p.CompletionRequest) -> PreparedRequest:
        refuse_unsupported(req)
        prompts: list[Any] = (
            [req.prompt]
            if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))
            else list(req.prompt)
        )
        if not prompts:
            raise InvalidRequest("'prompt' is empty.", param="prompt")
        if len(prompts) > self.limits.max_prompts:
            raise InvalidRequest(f"'prompt' may hold at most {self.limits.max_prompts} prompts.", param="prompt")
        served = await self.served(req.model)
        ids = await self.offload(completion_prompt_ids, self.directory.tokenizer, prompts)
        params = sampling(req, self.limits, max(map(len, ids)), self.directory.max_model_len, req.max_tokens)
        if self.log_prompts:
            log.info("prompt: %s", json.dumps(prompts))
        return PreparedRequest(
            served,
            ids,
            params,
            bool(req.stream),
            bool(req.stream_options and req.stream_options.include_usage),
            ref=req.model,
            content=prompts,
        )

    def response(self, name: str, texts: dict[int, str], reasons: dict[int, str], usage: p.Usage) -> p.Completion:
        return p.Completion(
            model=name,
            usage=usage,
            choices=[
                p.CompletionChoice(index=i, text=texts.get(i, ""), finish_reason=reasons[i]) for i in sorted(reasons)
            ],
        )

    def chunk(self, head: StreamHead, index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        choice = p.CompletionChoice(index=index, text=text or "", finish_reason=reason)
        data = p.Completion(id=head.id, created=head.created, model=head.model, choices=[choice]).model_dump()
        if not head.include_usage:  # `usage: null` on every chunk only when the client asked for usage
            data.pop("usage", None)
        return data

    def usage_chunk(self, head: StreamHead, usage: p.Usage) -> p.Completion:
        return p.Completion(id=head.id, created=head.created, model=head.model, choices=[], usage=usage)
