"""Property-based fuzzing of the request path against a real gateway (tiny model, uvicorn on loopback).

Bodies for both completion endpoints are drawn from plausible values and from hostile ones: extreme numbers,
NaN and Infinity (as JSON literals and as strings), surrogates, NUL and right-to-left text, deep nesting, wrong
types, missing and unknown fields, and raw bytes that are not JSON at all. Whatever arrives, the answer is never
a 5xx, every refusal has OpenAI's error shape, and a served answer (whole or streamed) is complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_support import Running, running_gateway

MODEL = "fuzz-model"
BUDGET_S = 45.0  # wall time for all examples together; later examples pass untried (shrinking is not bounded)


@pytest.fixture(scope="module")
def gateway(store) -> Iterator[Running]:
    store.publish(MODEL, seed=0, alias="production")
    limits = {
        "max_tokens": 8,  # served requests stay fast: anything longer is a 400
        "default_max_tokens": 4,
        "max_n": 2,
        "max_prompts": 2,
        "max_model_len": 256,
        "max_body_bytes": 65536,
    }
    with running_gateway([MODEL], limits=limits) as running:
        yield running


# values -------------------------------------------------------------------------------------------

EXTREME_NUMBERS = [
    0, 1, -1, 2, 3, 8, 9, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30), 10**300,
    0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, 1e-38, 5e-324, 1e-320, -1e-38, 1e308, -1e308, 1.7976931348623157e308,
    float("nan"), float("inf"), float("-inf"),
    "NaN", "nan", "Infinity", "-Infinity", "1e999", "-0", "0x10", "1_000", " 1 ", "", "2",
    True, False,
]  # fmt: skip
ODD_TEXT = [
    "", " ", "\x00", "a\x00b", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "\ufeff", "\U0001f600" * 3,
    "e\u0301", "\r\n\t", "{{ raise }}", "{% for %}", "<|im_end|>", "<|im_start|>", "</s>", "\\u0000", "null",
    "a" * 3000,
]  # fmt: skip
SURROGATES = ["\ud800", "\udfff", "x\udc00y", "\ud83d"]

numbers = st.one_of(
    st.sampled_from(EXTREME_NUMBERS),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
)
# Text a client could mean (any code point but lone surrogates), and text no client should send.
fair_texts = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=40))
texts = st.one_of(fair_texts, st.sampled_from(SURROGATES), st.text(st.characters(exclude_categories=()), max_size=40))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


wild = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(texts, scalars, max_size=3),
    st.integers(min_value=1, max_value=300).map(nested),  # deeper nesting is spliced in as text (bodies)
)

# Each field: values a well-behaved client may send (extreme but valid), then anything at all.
part = st.fixed_dictionaries({"type": st.just("text"), "text": fair_texts})
FAIR_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.one_of(fair_texts, st.lists(part, max_size=3), st.none()),
    },
    optional={"name": fair_texts},
)
WILD_MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "tool", "function", "robot"]), wild), "content": wild},
    optional={"name": wild, "tool_calls": wild, "weird": wild},
)
token_ids = st.lists(st.integers(min_value=0, max_value=49151), min_size=1, max_size=12)
FAIR: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([MODEL, f"{MODEL}/1", f"{MODEL}@production"]),
    "messages": st.lists(FAIR_MESSAGE, min_size=1, max_size=3),
    "prompt": st.one_of(
        fair_texts, st.lists(fair_texts, min_size=1, max_size=2), token_ids, st.lists(token_ids, max_size=2)
    ),
    "max_tokens": st.integers(min_value=1, max_value=8),
    "max_completion_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.one_of(st.floats(min_value=0, max_value=2), st.sampled_from([0, 1e-38, 5e-324, 1e-5, 2])),
    "top_p": st.one_of(st.floats(min_value=0, max_value=1, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1])),
    "n": st.integers(min_value=1, max_value=2),
    "seed": st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from([2**63 - 1, -(2**63)])),
    "stop": st.one_of(fair_texts, st.lists(fair_texts, max_size=4)),
    "stream": st.booleans(),
    "user": fair_texts,
    "frequency_penalty": st.sampled_from([0, 0.0, -0.0]),
    "presence_penalty": st.sampled_from([0, 0.0]),
    "logit_bias": st.just({}),
    "logprobs": st.sampled_from([False, None]),
    "top_logprobs": st.just(0),
    "service_tier": st.sampled_from(["auto", "default"]),
    "response_format": st.just({"type": "text"}),
    "metadata": st.dictionaries(fair_texts, fair_texts, max_size=2),
    "tools": st.just([]),
    "store": st.just(False),
    "best_of": st.just(1),
    "echo": st.just(False),
    "suffix": st.just(""),
}
MODEL_NAMES = [
    f"{MODEL}@candidate", f"{MODEL}/0", f"{MODEL}/2", f"{MODEL}/00001", f"{MODEL}/\u0661", f"{MODEL}/{10**23}",
    f"{MODEL}\n", f"{MODEL} ", "../../etc/passwd", "other-model", "", "fuzz-model/1/2", "fuzz-model@",
]  # fmt: skip
WILD: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.sampled_from(MODEL_NAMES), wild),
    "messages": st.one_of(st.lists(st.one_of(FAIR_MESSAGE, WILD_MESSAGE), max_size=3), wild),
    "prompt": st.one_of(st.lists(st.lists(wild, max_size=3), max_size=3), st.lists(wild, max_size=3), wild),
}
CHAT_FIELDS = sorted(set(FAIR) - {"model", "messages", "prompt", "best_of", "echo", "suffix"})
COMPLETION_FIELDS = sorted(
    set(FAIR)
    - {"model", "messages", "prompt", "max_completion_tokens", "response_format", "metadata", "tools", "store"}
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(path, body bytes). A third are fair (every field valid, values extreme but allowed); the rest mix in
    hostile values, missing and unknown fields, or are bytes that are barely JSON."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    hostile = draw(st.integers(0, 2)) > 0

    def value(name: str) -> Any:
        if hostile and not draw(st.integers(0, 2)):
            return draw(WILD.get(name, wild))
        return draw(FAIR[name])

    body: dict[str, Any] = {}
    for name in ("model", "messages" if chat else "prompt"):
        if not hostile or draw(st.integers(0, 9)):  # a hostile body sometimes lacks a required field
            body[name] = value(name)
    for name in draw(st.lists(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), max_size=6, unique=True)):
        body[name] = value(name)
    if body.get("stream") is True and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if "max_tokens" in body and "max_completion_tokens" in body and not hostile:
        del body["max_completion_tokens"]
    if hostile and not draw(st.integers(0, 4)):
        body[draw(texts)] = draw(wild)  # an unknown field (or an odd spelling of a known one)
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()  # NaN/Infinity as literals, \ud800 escaped
    mangle = draw(st.integers(0, 14)) if hostile else -1
    if mangle == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mangle == 1:
        raw = raw[:-1] + b', "seed": ' + b"7" * draw(st.integers(4000, 6000)) + b"}"
    elif mangle == 2:
        depth = draw(st.integers(500, 5000))
        raw = raw[:-1] + b', "tools": ' + b"[" * depth + b"]" * depth + b"}"
    elif mangle == 3:
        raw = draw(st.binary(max_size=64))
    elif mangle == 4:
        raw = json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-16", "surrogatepass")
    elif mangle == 5:
        raw = raw.replace(b'"', b"\xff", 1)
    return path, raw


def check(response: Any) -> None:
    assert response.status_code < 500, response.text[:2000]
    if response.status_code != 200:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == "invalid_request_error" and isinstance(error["message"], str), body
        assert error["param"] is None or isinstance(error["param"], str), body
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[:2000]
        for event in map(json.loads, events[:-1]):
            assert "error" not in event, event  # a failure after the headers: a server error in disguise
        return
    answer = response.json()
    assert answer["choices"] and answer["usage"]["completion_tokens"] <= 8 * len(answer["choices"]), answer
    assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"]), answer


def test_no_body_gets_a_5xx_and_every_refusal_has_the_openai_shape(gateway):
    started = time.monotonic()
    served = [0]

    @settings(
        max_examples=200,
        deadline=None,
        database=None,  # nothing written into the repository
        suppress_health_check=list(HealthCheck),
    )
    @given(request=bodies())
    def fuzz(request: tuple[str, bytes]) -> None:
        if time.monotonic() - started > BUDGET_S:
            return
        path, raw = request
        response = gateway.post(path, content=raw, headers={"Content-Type": "application/json"})
        check(response)
        served[0] += response.status_code == 200

    fuzz()
    # Worth something only if plausible bodies also got through to the engine.
    assert served[0] >= 5
