"""OpenAI request and response bodies (pydantic), kept apart from the logic that serves them.

Requests forbid unknown fields, and fields OpenAI defines but this server cannot honour are declared so the
check in `serving.py` can refuse them by name (400) instead of dropping them silently. Every number has the
range OpenAI accepts and must be finite, so no value that reaches the engine can break a batch.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # a seed is a 64-bit signed integer, as in OpenAI and vLLM


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage and no choices.")
    include_obfuscation: bool | None = Field(None, description="Accepted for compatibility; chunks are never padded.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `name`, `tool_calls`: checked in serving.py

    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="Who wrote the message; 'developer' is treated as 'system', tool roles are refused."
    )
    content: str | list[dict[str, Any]] | None = Field(
        None, description="The text, or a list of parts of which only text parts are supported."
    )


Penalty = Annotated[float, Field(ge=-2, le=2)]


class SamplingFields(Strict):
    model: str = Field(description="NAME, NAME@ALIAS or NAME/VERSION of a served model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (capped by the server's limit).")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature; 0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    n: int | None = Field(None, ge=1, le=128, description="Choices per prompt (capped by the server's limit).")
    stop: str | list[str] | None = Field(None, description="Strings that end the text; not included in it.")
    seed: int | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, description="Makes sampling repeatable: a 64-bit signed integer."
    )
    stream: bool | None = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only with stream: true.")
    user: str | None = Field(None, description="An end-user id for abuse monitoring: accepted, never used.")
    # Defined by OpenAI, refused unless neutral (see serving.NEUTRAL):
    frequency_penalty: Penalty | None = Field(None, description="Refused unless 0.")
    presence_penalty: Penalty | None = Field(None, description="Refused unless 0.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Refused unless empty."
    )
    logprobs: Any = Field(None, description="Refused unless off.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Refused unless 0.")
    service_tier: str | None = Field(None, description="Refused unless 'auto' or 'default'.")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; set one of them.")
    tools: list[dict[str, Any]] | None = Field(None, description="Refused unless empty.")
    tool_choice: Any = Field(None, description="Refused unless 'none'.")
    parallel_tool_calls: bool | None = Field(None, description="Refused when set.")
    functions: list[dict[str, Any]] | None = Field(None, description="Refused unless empty.")
    function_call: Any = Field(None, description="Refused unless 'none'.")
    response_format: dict[str, Any] | None = Field(None, description="Refused unless {'type': 'text'}.")
    modalities: list[str] | None = Field(None, description="Refused unless ['text'].")
    audio: dict[str, Any] | None = Field(None, description="Refused when set.")
    prediction: dict[str, Any] | None = Field(None, description="Refused when set.")
    reasoning_effort: str | None = Field(None, description="Refused when set.")
    store: bool | None = Field(None, description="Refused when true.")
    metadata: dict[str, str] | None = Field(None, description="Accepted, never stored.")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One or more prompts, as text or token ids."
    )
    best_of: int | None = Field(None, ge=1, le=20, description="Refused unless 1.")
    echo: bool | None = Field(None, description="Refused when true.")
    suffix: str | None = Field(None, description="Refused unless empty.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuneops"
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackRequest(Strict):
    completion_id: str = Field(
        min_length=1, max_length=128, description="The id of the answer rated ('chatcmpl-...' or 'cmpl-...')."
    )
    rating: str | int = Field(description="'good' or 'bad', or 1 (worst) to 5 (best).")
    comment: str | None = Field(None, max_length=10_000, description="Why; stored with e-mails, numbers masked.")
    correction: str | None = Field(
        None, max_length=100_000, description="The answer that should have been given; stored masked."
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> Any:
        if isinstance(value, bool) or value not in ("good", "bad", 1, 2, 3, 4, 5):
            raise ValueError("must be 'good', 'bad' or an integer from 1 to 5")
        return value


class FeedbackReceipt(BaseModel):
    object: Literal["feedback"] = Field("feedback", description="Always 'feedback'.")
    id: str = Field(description="The MLflow assessment id of the stored rating.")
    completion_id: str = Field(description="The answer rated.")
    trace_id: str = Field(description="The MLflow trace of that answer.")
    rating: float = Field(description="The rating normalised to [0, 1]: good 1, bad 0, 1-5 as (r-1)/4.")
