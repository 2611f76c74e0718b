"""Every error in OpenAI's shape with the right status, auth, and admission control (tiny model)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from test_serve_support import CHAT, Running, running_gateway

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def gateway(store) -> Iterator[Running]:
    from serve.auth import hash_key

    store.publish("tiny-model", seed=0, alias="production")
    store.publish("tiny-model", seed=9, broken="weights")  # version 2: never loads
    with running_gateway(
        ["tiny-model"],
        api_keys=[hash_key(k) for k in KEYS],
        expose="any",  # version 2 may be named, so its load failure shows
        limits={"max_model_len": 128, "max_body_bytes": 16384, "max_n": 2},
    ) as running:
        yield running


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "detail" not in body
    return body["error"]


def post_chat(gw: Running, body: object, key: str = KEYS[0], **kw) -> httpx.Response:
    return gw.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, **kw)


def test_api_keys_several_accepted_others_refused_probes_open(gateway):
    for key in KEYS:
        assert gateway.client(key).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as err:
        gateway.client("wrong").chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
    assert err.value.body["code"] == "invalid_api_key"
    r = gateway.post("/v1/chat/completions", json={"model": "tiny-model", "messages": CHAT})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert gateway.get("/v1/models").status_code == 401
    for path in ("/health/live", "/health/ready", "/health/startup", "/metrics"):
        assert gateway.get(path).status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "tiny-model", "messages": CHAT, "logprobs": True}, "logprobs", "unsupported_parameter"),
        (
            {"model": "tiny-model", "messages": CHAT, "frequency_penalty": 0.5},
            "frequency_penalty",
            "unsupported_parameter",
        ),
        (
            {"model": "tiny-model", "messages": CHAT, "tools": [{"type": "function"}]},
            "tools",
            "unsupported_parameter",
        ),
        (
            {"model": "tiny-model", "messages": CHAT, "response_format": {"type": "json_object"}},
            "response_format",
            "unsupported_parameter",
        ),
        ({"model": "tiny-model", "messages": CHAT, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"model": "tiny-model", "messages": CHAT, "temperature": 3}, "temperature", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "temperature": -0.5}, "temperature", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "seed": 10**30, "temperature": 0.7}, "seed", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "seed": 2**63}, "seed", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "seed": -(2**63) - 1}, "seed", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "seed": 1e30}, "seed", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "top_p": 0}, "top_p", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "top_p": 1.5}, "top_p", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
        (
            {"model": "tiny-model", "messages": CHAT, "max_completion_tokens": 0},
            "max_completion_tokens",
            "invalid_value",
        ),
        ({"model": "tiny-model", "messages": CHAT, "n": 0}, "n", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "n": 10**6}, "n", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "presence_penalty": -3}, "presence_penalty", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "logit_bias": {"5": 101}}, "logit_bias.5", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "temperature": "NaN"}, "temperature", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "top_p": "-Infinity"}, "top_p", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "n": 3}, "n", "invalid_value"),
        ({"model": "tiny-model", "messages": CHAT, "max_tokens": 100000}, "max_tokens", "invalid_value"),
        (
            {"model": "tiny-model", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "invalid_value",
        ),
        (
            {"model": "tiny-model", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
            "unsupported_parameter",
        ),
        ({"model": "tiny-model"}, "messages", "missing_required_parameter"),
        ({"model": "tiny-model", "messages": CHAT, "max_tokens": 120}, "messages", "context_length_exceeded"),
    ],
)
def test_invalid_requests_are_400_naming_the_parameter(gateway, body, param, code):
    r = post_chat(gateway, body)
    assert r.status_code == 400
    err = error_of(r)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")


CHAT_JSON = '{"model": "tiny-model", "messages": [{"role": "user", "content": "Hi"}]'


@pytest.mark.parametrize(
    ("raw", "param", "code", "says"),
    [
        (CHAT_JSON + ', "seed": 1' + "0" * 5000 + "}", None, "invalid_json", "digits"),
        (CHAT_JSON + ', "max_tokens": ' + "9" * 4400 + "}", None, "invalid_json", "digits"),
        (CHAT_JSON + ', "tools": ' + "[" * 5000 + "]" * 5000 + "}", None, "invalid_json", "nested"),
        ("[" * 5000 + "]" * 5000, None, "invalid_json", "nested"),
        ('{"a": ' * 2000 + "1" + "}" * 2000, None, "invalid_json", "nested"),
        (CHAT_JSON + ', "temperature": NaN}', None, "invalid_json", "NaN"),
        (CHAT_JSON + ', "seed": -Infinity}', None, "invalid_json", "Infinity"),
        (CHAT_JSON + ', "temperature": 1e999}', "temperature", "invalid_value", "finite"),
        (CHAT_JSON + ', "top_p": -1e999}', "top_p", "invalid_value", "finite"),
        (CHAT_JSON + ', "max_tokens": 1e999}', "max_tokens", "invalid_value", "finite"),
        (CHAT_JSON + ', "seed": 1e308}', "seed", "invalid_value", "seed"),
        (CHAT_JSON + ', "frequency_penalty": 1e999}', "frequency_penalty", "invalid_value", "finite"),
        ('{"model": "tiny-model", "prompt": "a\\udc00", "max_tokens": 2}', "prompt", "invalid_value", "surrogate"),
        (
            '{"model": "tiny-model", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
            "messages[0].content",
            "invalid_value",
            "surrogate",
        ),
        (
            '{"model": "tiny-model", "prompt": ["ok", "\\ud83d"], "max_tokens": 2}',
            "prompt",
            "invalid_value",
            "surrogate",
        ),
    ],
    ids=[
        "5000-digit-int",
        "4400-digit-int",
        "5000-nested-arrays-in-a-field",
        "5000-nested-arrays",
        "2000-nested-objects",
        "NaN-literal",
        "Infinity-literal",
        "temperature-inf",
        "top_p-minus-inf",
        "max_tokens-inf",
        "seed-1e308",
        "penalty-inf",
        "prompt-lone-surrogate",
        "message-lone-surrogate",
        "prompt-list-lone-surrogate",
    ],
)
def test_extreme_numbers_nesting_and_surrogates_are_400_not_500(gateway, raw, param, code, says):
    path = "/v1/completions" if '"prompt"' in raw else "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    r = gateway.post(path, content=raw.encode(), headers=auth)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert says in err["message"]
    assert post_chat(gateway, {"model": "tiny-model", "messages": CHAT, "max_tokens": 2}).status_code == 200


def test_context_length_is_checked_through_the_client(gateway):
    with pytest.raises(openai.BadRequestError) as err:
        gateway.client(KEYS[0]).completions.create(model="tiny-model", prompt="word " * 200, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"


def test_bad_json_too_large_body_unknown_route_and_model(gateway):
    auth = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    r = gateway.post("/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = post_chat(gateway, {"model": "tiny-model", "messages": [{"role": "user", "content": "x" * 20000}]})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

    def chunks():
        for _ in range(20):
            yield b" " * 1000

    r = gateway.post("/v1/chat/completions", content=chunks(), headers=auth)  # chunked: no content-length
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = gateway.get("/v1/nowhere")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = post_chat(gateway, {"model": "other-model", "messages": CHAT})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = post_chat(gateway, {"model": "tiny-model/2", "messages": CHAT})  # a version that fails to load
    assert r.status_code == 404 and "failed to load" in error_of(r)["message"]
    assert r.headers["x-request-id"]


def test_a_burst_beyond_the_queue_gets_429_with_retry_after_and_the_rest_succeed(store):
    store.publish("burst-model", seed=2, alias="production")
    with running_gateway(["burst-model"], limits={"max_batch_size": 1, "max_queue": 1}) as gw:
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def one() -> None:
            r = gw.post("/v1/chat/completions", json={"model": "burst-model", "messages": CHAT, "max_tokens": 200})
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 429} and codes.count(200) >= 1
        limited = [r for r in results if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and error_of(r)["code"] == "queue_full" for r in limited)
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in results if r.status_code == 200)
        # The official client retries a 429 after Retry-After and then gets through.
        client = gw.client(max_retries=5)
        assert client.chat.completions.create(model="burst-model", messages=CHAT, max_tokens=2).choices


def test_queue_timeout_in_a_stream_arrives_as_a_final_error_event(store):
    store.publish("slow-model", seed=3, alias="production")
    with running_gateway(
        ["slow-model"],
        limits={"max_batch_size": 1, "max_queue": 4, "queue_timeout_s": 0.3, "max_tokens": 2000},
    ) as gw:
        client = gw.client()
        hog = client.chat.completions.create(model="slow-model", messages=CHAT, max_tokens=2000, stream=True)
        next(iter(hog))  # the only batch slot is now taken
        with pytest.raises(openai.APIError) as err:
            for _ in client.chat.completions.create(model="slow-model", messages=CHAT, max_tokens=4, stream=True):
                pass
        assert "queue" in err.value.message
        hog.close()
