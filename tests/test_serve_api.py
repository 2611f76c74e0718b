"""The OpenAI protocol through the official client against a real gateway on loopback (tiny model)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve_support import CHAT, Running, running_gateway


@pytest.fixture(scope="module")
def gateway(store) -> Iterator[Running]:
    """tiny-model: version 1 in production, version 2 the candidate."""
    store.publish("tiny-model", seed=0, alias="production")
    store.publish("tiny-model", seed=1, alias="candidate")
    with running_gateway(["tiny-model"]) as running:
        yield running


def test_chat_completion_answers_with_usage_and_request_id(gateway):
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="tiny-model", messages=CHAT, max_tokens=8, temperature=0
    )
    assert raw.headers["x-request-id"]
    out = raw.parse()
    assert out.object == "chat.completion" and out.model == "tiny-model"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_streamed_chat_equals_the_plain_answer_and_reports_usage(gateway):
    client = gateway.client()
    plain = client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-model",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_with_several_prompts_and_n_streamed_and_not(gateway):
    client = gateway.client()
    out = client.completions.create(
        model="tiny-model", prompt=["Once upon", "A permit is"], n=2, max_tokens=5, temperature=0.9, seed=3
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 20
    chunks = list(
        client.completions.create(model="tiny-model", prompt="Once upon", max_tokens=6, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = client.completions.create(model="tiny-model", prompt="Once upon", max_tokens=6, temperature=0)
    assert streamed == plain.choices[0].text and plain.choices[0].finish_reason == "length"


def test_seed_repeats_sampling_top_p_narrows_it_and_stop_cuts_the_text(gateway):
    client = gateway.client()

    def ask(**kw):
        return client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=16, **kw).choices[0]

    a, b = ask(temperature=1.0, seed=11), ask(temperature=1.0, seed=11)
    assert a.message.content == b.message.content
    assert {ask(temperature=1.0, seed=s).message.content for s in range(4)} != {a.message.content}
    full = ask(temperature=0).message.content
    assert ask(temperature=1.0, top_p=1e-6, seed=5).message.content == full  # the nucleus is the top token
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = ask(temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]


def test_models_lists_versions_and_aliases_with_their_base(gateway, tiny_base):
    models = {m.id: m for m in gateway.client().models.list()}
    assert set(models) == {"tiny-model", "tiny-model/1", "tiny-model/2", "tiny-model@candidate"}
    assert {m.parent for m in models.values()} == {str(tiny_base)}
    client = gateway.client()
    one = client.chat.completions.create(model="tiny-model/1", messages=CHAT, max_tokens=8, temperature=0)
    two = client.chat.completions.create(model="tiny-model@candidate", messages=CHAT, max_tokens=8, temperature=0)
    prod = client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=8, temperature=0)
    assert one.choices[0].message.content != two.choices[0].message.content
    assert one.choices[0].message.content == prod.choices[0].message.content


def test_mixed_adapters_share_a_batch_and_each_answers_as_alone(gateway):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from test_serve_support import wait_for

    client = gateway.client()
    engine = gateway.gateway.engine

    def ask(model, temperature=0.0):
        return (
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=temperature)
            .choices[0]
            .message.content
        )

    alone = {m: ask(m) for m in ("tiny-model/1", "tiny-model/2")}
    assert alone["tiny-model/1"] != alone["tiny-model/2"]
    models = ["tiny-model/1", "tiny-model/2"] * 3
    mixed_steps = engine.decode_steps_by_adapters[2]
    entered, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(7) as pool:
        # The engine waits inside a call until every request is queued, so all of them join one batch.
        hold = engine.call(lambda: entered.set() or release.wait(30))
        assert entered.wait(30)
        try:
            futures = [pool.submit(ask, m) for m in models]
            futures.append(pool.submit(ask, "tiny-model/1", 1e-44))  # greedy (logits / 1e-44 would overflow)
            wait_for(lambda: gateway.metric("tuneops:num_requests_waiting") == 7, "every request to be queued")
        finally:
            release.set()
            hold.result(30)
        together = [f.result() for f in futures]
    assert together == [alone[m] for m in models] + [alone["tiny-model/1"]]
    assert engine.decode_steps_by_adapters[2] > mixed_steps  # both versions ran in the same decode steps
    assert gateway.metric("tuneops:adapter_loads_total", outcome="success") == 2


@pytest.mark.parametrize("model", ["nope", "tiny-model@nosuchalias", "tiny-model/99", "bad name!"])
def test_unknown_model_is_404_never_the_base(gateway, model):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        gateway.client().chat.completions.create(model=model, messages=CHAT, max_tokens=4)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_64_bit_range_are_served_and_repeat(gateway, seed):
    client = gateway.client()

    def ask():
        out = client.chat.completions.create(
            model="tiny-model", messages=CHAT, max_tokens=6, temperature=0.7, n=2, seed=seed
        )
        return [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]

    assert ask() == ask()


@pytest.mark.parametrize("temperature", [1e-38, 5e-324])
def test_a_tiny_positive_temperature_is_served_as_greedy(gateway, temperature):
    client = gateway.client()
    greedy = client.completions.create(model="tiny-model", prompt="Once upon", max_tokens=8, temperature=0)
    tiny = client.completions.create(model="tiny-model", prompt="Once upon", max_tokens=8, temperature=temperature)
    assert tiny.choices[0].text == greedy.choices[0].text


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _SpyTokenizer:
    """Stands in for the gateway's tokenizer: records which threads template and tokenize, and holds a huge
    prompt until released, so a test can see whether anything else is answered meanwhile."""

    def __init__(self, real, huge: int) -> None:
        self.real = real
        self.huge = huge
        self.release = threading.Event()
        self.holding = threading.Event()
        self.on_loop: list[bool] = []

    def _note(self, text_len: int) -> None:
        self.on_loop.append(_on_event_loop())
        if text_len >= self.huge:
            self.holding.set()
            self.release.wait(20)  # bounded: a stalled event loop fails the test instead of hanging it

    def __call__(self, text, *args, **kwargs):
        self._note(len(text))
        return self.real(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self._note(sum(len(m["content"]) for m in messages))
        return self.real.apply_chat_template(messages, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.real)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_huge_prompt_is_templated_off_the_event_loop_while_others_are_answered(gateway, endpoint, monkeypatch):
    import serve.api

    directory = gateway.gateway.directory
    spy = _SpyTokenizer(directory.tokenizer, huge=500_000)
    real_parse = serve.api.parse

    def parse(*args):
        spy.on_loop.append(_on_event_loop())
        return real_parse(*args)

    monkeypatch.setattr(serve.api, "parse", parse)
    text = "word " * 150_000  # 750 kB: about a second of tokenizing, and far over the context window
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"model": "tiny-model", "messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"model": "tiny-model", "prompt": text}
    directory.tokenizer = spy
    try:
        with ThreadPoolExecutor(1) as pool:
            huge = pool.submit(gateway.post, path, json=body)
            assert spy.holding.wait(30), "the huge prompt never reached the tokenizer"
            # While its tokenizing is held, the event loop still answers: a probe and a small request.
            assert httpx.get(gateway.url + "/health/live", timeout=10).status_code == 200
            small = httpx.post(
                gateway.url + "/v1/chat/completions",
                json={"model": "tiny-model", "messages": CHAT, "max_tokens": 2},
                timeout=10,
            )
            assert small.status_code == 200
            spy.release.set()
            r = huge.result(60)
    finally:
        spy.release.set()
        directory.tokenizer = spy.real
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(spy.on_loop) >= 4 and not any(spy.on_loop)  # parsing, templating, tokenizing: all off the loop
