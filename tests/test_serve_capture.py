"""Traffic capture: requests through the official client become MLflow traces, read back with core.traffic."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from test_serve_support import CHAT, Running, free_port, running_gateway, wait_for

from core.traffic import mask_pii, read_traffic
from serve.auth import hash_key

ALICE = "sk-alice-secret"
BOB = "sk-bob-secret"


def _keys() -> dict:
    return {"api_keys": [hash_key(ALICE), hash_key(BOB)], "api_key_labels": {hash_key(ALICE): "alice"}}


def traffic(uri: str, model: str = "tiny-model") -> list:
    from mlflow import MlflowClient

    return read_traffic(MlflowClient(uri), model, None)


def record_of(uri: str, completion_id: str):
    def found():
        return next((r for r in traffic(uri) if r.request_id == completion_id), None)

    return wait_for(found, f"the trace of {completion_id}")


@pytest.fixture(scope="module")
def gateway(store) -> Iterator[Running]:
    """tiny-model: version 1 in production, version 2 the candidate; two keys, one of them named."""
    store.publish("tiny-model", seed=0, alias="production")
    store.publish("tiny-model", seed=1, alias="candidate")
    with running_gateway(["tiny-model"], **_keys()) as running:
        yield running


def test_a_chat_answer_becomes_a_trace_with_its_numbers_and_content(gateway, store):
    out = gateway.client(ALICE).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=6, temperature=0)
    rec = record_of(store.uri, out.id)
    assert (rec.model, rec.version, rec.alias, rec.endpoint) == ("tiny-model", "1", "production", "chat")
    assert (rec.status, rec.http_status, rec.error) == ("ok", 200, None)
    assert rec.api_key_label == "alice"
    assert rec.finish_reasons == (out.choices[0].finish_reason,) == ("length",)
    assert (rec.prompt_tokens, rec.completion_tokens) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert rec.ttft_s is not None and 0 < rec.ttft_s <= rec.latency_s < 60
    assert rec.messages == CHAT and rec.prompt == CHAT[-1]["content"]
    assert rec.completion == out.choices[0].message.content
    assert rec.feedback == ()
    assert abs(rec.started_at.timestamp() - time.time()) < 120


def test_the_trace_is_an_mlflow_trace_in_the_models_traffic_experiment(gateway, store):
    from mlflow import MlflowClient

    out = gateway.client(ALICE).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=3)
    rec = record_of(store.uri, out.id)
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name("traffic/tiny-model")
    assert experiment is not None
    trace = client.get_trace(rec.trace_id)
    assert trace.info.experiment_id == experiment.experiment_id
    assert trace.info.client_request_id == out.id and trace.info.state.value == "OK"
    assert json.loads(trace.info.trace_metadata["mlflow.trace.tokenUsage"])["output_tokens"] == 3
    (root,) = trace.data.spans
    assert root.span_type == "CHAT_MODEL" and root.inputs == {"messages": CHAT}
    assert [e.name for e in root.events] == ["first_token"]


def test_a_streamed_completion_on_an_alias_and_a_pinned_version(gateway, store):
    client = gateway.client(BOB)
    chunks = list(
        client.completions.create(
            model="tiny-model@candidate", prompt="Once upon", max_tokens=5, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    rec = record_of(store.uri, chunks[0].id)
    assert (rec.version, rec.alias, rec.endpoint, rec.api_key_label) == (
        "2",
        "candidate",
        "completions",
        "key-" + hash_key(BOB)[:8],
    )
    assert rec.prompt == "Once upon" and rec.messages is None and rec.completion == streamed
    assert rec.completion_tokens == 5 and rec.finish_reasons == ("length",)

    pinned = client.completions.create(model="tiny-model/1", prompt="Once upon", max_tokens=2, n=2)
    rec = record_of(store.uri, pinned.id)
    assert (rec.version, rec.alias) == ("1", None)
    assert rec.finish_reasons == ("length", "length") and rec.completion_tokens == 4


def test_personal_data_in_a_prompt_is_masked_before_it_is_stored(gateway, store):
    from mlflow import MlflowClient

    secret = (
        "I am jane.roe@example.org, phone +34 612 345 678, card 4111 1111 1111 1111, "
        "IBAN ES91 2100 0418 4502 0005 1332, account number 12345678. Can I build a carport?"
    )
    out = gateway.client(ALICE).chat.completions.create(
        model="tiny-model", messages=[{"role": "user", "content": secret}], max_tokens=2
    )
    rec = record_of(store.uri, out.id)
    assert rec.prompt == (
        "I am [EMAIL], phone [PHONE], card [CARD], IBAN [IBAN], account number [ACCOUNT]. Can I build a carport?"
    )
    stored = MlflowClient(store.uri).get_trace(rec.trace_id).to_json()
    for raw in ("jane.roe", "612 345 678", "4111 1111", "ES91", "12345678"):
        assert raw not in stored


def test_the_api_key_itself_is_never_stored(gateway, store):
    from mlflow import MlflowClient

    out = gateway.client(ALICE).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
    rec = record_of(store.uri, out.id)
    stored = MlflowClient(store.uri).get_trace(rec.trace_id).to_json()
    assert ALICE not in stored and hash_key(ALICE) not in stored


def test_written_traces_are_counted_in_metrics(gateway):
    before = gateway.metric("tuneops:traces_written_total", model_name="tiny-model")
    gateway.client(ALICE).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
    wait_for(
        lambda: gateway.metric("tuneops:traces_written_total", model_name="tiny-model") > before, "the trace count"
    )
    assert gateway.metric("tuneops:traces_dropped_total") == 0


def test_a_writer_process_that_dies_is_replaced(gateway, store):
    capture = gateway.gateway.capture
    gateway.client(ALICE).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
    writer = wait_for(lambda: capture._writer, "the writer process")
    writer.kill()
    wait_for(lambda: capture._inbox is None, "the gateway to notice")
    out = gateway.client(ALICE).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
    assert record_of(store.uri, out.id).status == "ok"
    assert capture._writer is not writer and capture._writer.is_alive()


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("write to john.doe+faq@mail.example.co.uk today", "write to [EMAIL] today"),
        ("call +44 20 7946 0958 or (612) 345-6789 or 555-1234", "call [PHONE] or [PHONE] or [PHONE]"),
        ("card 4111-1111-1111-1111 and 5500 0000 0000 0004", "card [CARD] and [CARD]"),
        ("pay to DE89 3704 0044 0532 0130 00 or GB29NWBK60161331926819", "pay to [IBAN] or [IBAN]"),
        ("bank account no. 0123-4567-89 and acct #987654321", "bank account no. [ACCOUNT] and acct #[ACCOUNT]"),
    ],
    ids=["email", "phone", "card", "iban", "account"],
)
def test_each_kind_of_personal_data_is_masked(text, masked):
    assert mask_pii(text) == masked


def test_masking_keeps_ordinary_numbers():
    text = "On 2024-01-15 at 10:30 the 3-storey house of 1200 m2 cost 250,000 EUR (ref 1234567)."
    assert mask_pii(text) == text


@pytest.fixture
def fresh_store(mlflow_store, make_version) -> str:
    """A store of its own (the gateway's too), so a test can show what was, or was not, written to it."""
    make_version("tiny-model", seed=0, alias="production")
    return mlflow_store


@pytest.mark.parametrize("capture", [{"enabled": False}, {"sample_rate": 0.0}], ids=["off", "sample-rate-0"])
def test_no_trace_is_written_when_capture_is_off_or_samples_nothing(fresh_store, capture):
    with running_gateway(["tiny-model"], capture=capture) as running:
        for _ in range(3):
            running.client().chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
        time.sleep(1.0)  # a writer, were there one, has had time to write
        assert running.metric("tuneops:traces_written_total") == 0
        assert running.gateway.capture._writer is None
    assert traffic(fresh_store) == []


def test_content_false_keeps_the_numbers_and_not_the_text(fresh_store):
    with running_gateway(["tiny-model"], capture={"content": False}) as running:
        out = running.client().chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=4)
        rec = record_of(fresh_store, out.id)
    assert (rec.messages, rec.prompt, rec.completion) == (None, None, None)
    assert rec.completion_tokens == 4 and rec.api_key_label is None and rec.finish_reasons == ("length",)


def test_refused_and_abandoned_requests_are_traced_as_errors(fresh_store):
    import httpx
    import openai

    limits = {"max_batch_size": 1, "max_queue": 0, "max_tokens": 1800}
    with running_gateway(["tiny-model"], limits=limits) as running:
        client = running.client()
        stream = client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=1800, stream=True)
        it = iter(stream)
        head = next(it)
        with pytest.raises(openai.RateLimitError):  # the one batch row is taken, and no request may wait
            client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)
        stream.close()
        wait_for(lambda: running.metric("tuneops:num_requests_running") == 0, "the abandoned stream to leave")
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
            httpx.post(
                running.url + "/v1/chat/completions",
                timeout=1.0,
                json={"model": "tiny-model", "messages": CHAT, "max_tokens": 1800},
            )
        wait_for(lambda: len(traffic(fresh_store)) == 3, "three traces")
    gone, refused, timed_out = traffic(fresh_store)  # oldest first: the stream arrived before the other two
    assert (refused.status, refused.http_status, refused.completion_tokens) == ("error", 429, 0)
    assert refused.error and "capacity" in refused.error and refused.ttft_s is None
    assert (gone.request_id, gone.status, gone.http_status) == (head.id, "error", 499)
    assert gone.finish_reasons == () and gone.completion  # the text sent before it left (tokens count finished choices)
    assert (timed_out.status, timed_out.http_status, timed_out.finish_reasons) == ("error", 499, ())


def test_a_down_tracking_server_neither_fails_nor_holds_requests_and_drops_are_counted(fresh_store):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    capture = {"tracking_uri": down, "buffer_size": 2, "feedback_wait_s": 0.5, "feedback_timeout_s": 5}
    with running_gateway(["tiny-model"], capture=capture) as running:
        client = running.client()
        client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2)  # warm
        started = time.perf_counter()
        ids = [client.chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=2).id for _ in range(6)]
        elapsed = time.perf_counter() - started
        # The writer is stuck retrying one trace (MLflow retries for minutes) and the buffer holds two: the other
        # records are dropped and counted, and the requests went on at their own pace.
        assert running.metric("tuneops:traces_dropped_total", reason="buffer_full") >= 4
        assert elapsed < 30
        assert running.metric("tuneops:traces_queued") in (2, 3)
        # Feedback on an answer whose trace cannot be written is a clear 503, not a hang.
        reply = running.post("/v1/feedback", json={"completion_id": ids[0], "rating": "good"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "tracking_unavailable"


def test_the_shipped_config_turns_capture_on_and_every_capture_field_is_described(monkeypatch):
    from pathlib import Path

    from serve.settings import CaptureSettings, load_settings

    s = load_settings(Path(__file__).parents[1] / "configs" / "serve.yaml")
    assert (s.capture.enabled, s.capture.experiment, s.capture.sample_rate) == (True, "traffic/{model}", 1.0)
    assert all(f.description for f in CaptureSettings.model_fields.values())
    monkeypatch.setenv("TUNEOPS_SERVE_CAPTURE__ENABLED", "false")
    assert load_settings(Path(__file__).parents[1] / "configs" / "serve.yaml").capture.enabled is False


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("capture: {sample_rate: 1.5}\n", "capture.sample_rate (line 2)"),
        ("capture: {experiment: traffic}\n", "capture.experiment (line 2)"),
        ("capture: {experiment: 'traffic/{name}'}\n", "capture.experiment (line 2)"),
        ("capture: {buffer_sise: 3}\n", "capture.buffer_sise (line 2)"),
        (f"api_key_labels: {{'{'b' * 64}': bob}}\n", "not in api_keys"),
    ],
)
def test_bad_capture_settings_are_refused_with_their_line(tmp_path, text, problem):
    from core.errors import ConfigError
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text("models: [m]\n" + text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert problem in str(err.value)


def test_a_plain_key_in_the_labels_is_never_printed_back(tmp_path):
    from core.errors import ConfigError
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text("models: [m]\napi_key_labels: {sk-very-secret-key: me}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "api_key_labels" in str(err.value) and "sk-very-secret" not in str(err.value)
