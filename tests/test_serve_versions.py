"""Which versions a gateway lets clients name and lists, and how it loads, retries and forgets them (tiny model)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from test_serve_support import CHAT, Running, running_gateway, wait_for

GATED = "gate-model"


def answer(client: Any, model: str, max_tokens: int = 8) -> str:
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, temperature=0)
    return out.choices[0].message.content


def refused(client: Any, model: str) -> str:
    """The message of the 404 a request for `model` gets."""
    with pytest.raises(openai.NotFoundError) as err:
        answer(client, model)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    return err.value.body["message"]


def folders(gw: Running, name: str) -> set[str]:
    """The version folders the gateway keeps for a model in its work folder."""
    root = gw.gateway.directory.workdir / name
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


class CountingClient:
    """An MlflowClient stand-in that records each call (method name and arguments) before passing it on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            return attr(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def gated(store, tmp_path_factory) -> Iterator[Running]:
    """gate-model under the default exposure (gated):
    1 production; 2 passed its evaluation; 3 never evaluated; 4 failed its gates; 5 the `canary` alias, never
    evaluated; 6 passed but its artifacts are gone; 7 registered by something other than tuneops."""
    from core.aliases import FAIL, PASS
    from core.registry import connect

    store.publish(GATED, seed=0, alias="production")
    store.publish(GATED, seed=1, verdict=PASS)
    store.publish(GATED, seed=2)
    store.publish(GATED, seed=3, verdict=FAIL)
    store.publish(GATED, seed=4, alias="canary")
    gone = store.publish(GATED, seed=5, verdict=PASS)
    shutil.rmtree(store.artifacts(GATED, gone.version))
    foreign = tmp_path_factory.mktemp("foreign")
    (foreign / "model.pkl").write_bytes(b"something else")
    connect(store.uri).create_model_version(GATED, source=str(foreign))
    with running_gateway([GATED]) as running:
        yield running


def test_gated_exposure_serves_aliases_and_passing_or_aliased_versions_only(gated):
    client = gated.client()
    for model in (GATED, f"{GATED}@canary", f"{GATED}/1", f"{GATED}/2", f"{GATED}/5"):
        assert answer(client, model)
    for version in ("3", "4"):
        message = refused(client, f"{GATED}/{version}")
        assert "not exposed" in message and "passing evaluation" in message
    assert gated.metric("tuneops:adapter_loads_total", model_name=GATED, version="3") == 0


def test_version_numbers_are_normalised_and_impossible_ones_never_reach_the_registry(gated, monkeypatch):
    directory = gated.gateway.directory
    counting = CountingClient(directory.client)
    monkeypatch.setattr(directory, "client", counting)
    client = gated.client()
    assert len({answer(client, f"{GATED}/{v}") for v in ("2", "02", "002")}) == 1
    assert gated.metric("tuneops:adapter_loads_total", model_name=GATED, version="2", outcome="success") == 1
    assert gated.metric("tuneops:adapter_loads_total", model_name=GATED, version="02") == 0
    assert gated.metric("tuneops:adapter_loads_total", model_name=GATED, version="002") == 0

    def lookups(version: str) -> int:
        return sum(1 for name, args in counting.calls if name == "get_model_version" and str(args[1]) == version)

    for version in ("0", "000", "9" * 30, "9" * 5000):
        assert "no such version" in refused(client, f"{GATED}/{version}")
        assert lookups(version) == 0 and lookups(version.lstrip("0")) == 0
    for model in (f"{GATED}/-1", f"{GATED}/1.5", f"{GATED}/\u0661"):  # negative, not a number, a non-ASCII digit
        refused(client, model)
    assert not [c for c in counting.calls if c[0] == "get_model_version" and str(c[1][1]) in ("-1", "1.5", "\u0661")]
    assert "no such version" in refused(client, f"{GATED}/99")
    assert lookups("99") == 1


def test_models_lists_from_registry_metadata_without_downloading_and_skips_broken_and_foreign(gated):
    before = folders(gated, GATED)
    r = gated.get("/v1/models")
    assert r.status_code == 200
    ids = {m["id"] for m in r.json()["data"]}
    assert ids == {GATED, f"{GATED}@canary", f"{GATED}/1", f"{GATED}/2", f"{GATED}/5", f"{GATED}/6"}
    assert folders(gated, GATED) == before  # nothing downloaded
    assert gated.get(f"/v1/models/{GATED}/2").status_code == 200

    assert "failed to load" in refused(gated.client(), f"{GATED}/6")  # listed from metadata, found broken on use
    assert f"{GATED}/6" not in {m["id"] for m in gated.get("/v1/models").json()["data"]}
    assert folders(gated, GATED) == before  # the failed download was removed


@pytest.mark.parametrize(
    ("expose", "versions"),
    [("aliases", set()), ("gated", {"1", "2", "5", "6"}), ("any", {"1", "2", "3", "4", "5", "6"})],
)
def test_what_is_listed_and_nameable_follows_the_exposure_setting(gated, store, tmp_path, expose, versions):
    from core.registry import connect
    from serve.errors import ModelNotFound
    from serve.metrics import Metrics
    from serve.settings import ServeSettings
    from serve.versions import VersionDirectory

    settings = ServeSettings(models=[GATED], expose=expose, tracking_uri=store.uri)
    directory = VersionDirectory(settings, engine=None, metrics=Metrics(), workdir=tmp_path)  # type: ignore[arg-type]
    directory.client = connect(store.uri)
    ids = {i for i, _, _ in directory.listing()}
    assert {i.split("/")[1] for i in ids if "/" in i} == versions
    assert {GATED, f"{GATED}@canary"} <= ids
    assert not any(tmp_path.iterdir())
    if expose == "aliases":
        with pytest.raises(ModelNotFound, match="name an alias"):
            directory.lookup(f"{GATED}/1")


def test_a_promotion_takes_effect_while_user_requests_fill_the_queue(store):
    store.publish("busy-model", seed=0, alias="production")
    new = store.publish("busy-model", seed=1)
    limits = {"max_batch_size": 1, "max_queue": 64}
    # Ten users keep about nine requests queued, seconds of waiting here: more than a warm-up may take.
    with running_gateway(["busy-model"], load_timeout_s=2, limits=limits) as gw:
        client = gw.client()
        stop = threading.Event()
        errors: list[Exception] = []

        def user() -> None:
            while not stop.is_set():
                try:
                    answer(client, "busy-model", 60)
                except Exception as exc:
                    errors.append(exc)

        users = [threading.Thread(target=user) for _ in range(10)]
        for t in users:
            t.start()
        try:
            wait_for(lambda: gw.metric("tuneops:num_requests_waiting") >= 8, "a full queue")
            store.move("busy-model", "production", new.version)
            wait_for(
                lambda: (
                    gw.metric("tuneops:served_version", model_name="busy-model", alias="production") == int(new.version)
                ),
                "the switch under load",
            )
            assert gw.metric("tuneops:num_requests_waiting") >= 4  # it switched while the queue was still full
        finally:
            stop.set()
            for t in users:
                t.join(120)
        assert not errors
        assert gw.metric("tuneops:adapter_loads_total", model_name="busy-model", version=new.version) == 1
        assert answer(client, "busy-model") == answer(client, "busy-model/2")


def test_a_version_that_failed_is_retried_with_backoff_and_serves_once_repaired(store):
    v1 = store.publish("retry-model", seed=0, alias="production")
    bad = store.publish("retry-model", seed=1, broken="weights")
    with running_gateway(["retry-model"], retry_max_backoff_s=1.0) as gw:
        store.move("retry-model", "production", bad.version)
        failures = {"model_name": "retry-model", "version": bad.version, "outcome": "failure"}
        wait_for(lambda: gw.metric("tuneops:adapter_loads_total", **failures) >= 2, "a retry of the failed version")
        assert gw.ready()  # the old version still serves...
        assert answer(gw.client(), "retry-model")
        assert gw.metric("tuneops:alias_behind", model_name="retry-model", alias="production") == 1  # ...but behind
        probe = gw.get("/health/ready")
        behind = probe.json()["behind"]["retry-model"]
        assert probe.status_code == 200 and probe.json()["status"] == "ok"
        assert (behind["serving"], behind["target"]) == (v1.version, bad.version) and behind["error"]
        wait_for(lambda: folders(gw, "retry-model") == {v1.version}, "no folder left by a failed try")

        good = store.root / "bundle-retry-model-0-None" / "adapter" / "adapter_model.safetensors"  # version 1's
        for path in store.artifacts("retry-model", bad.version).rglob("adapter_model.safetensors"):
            shutil.copyfile(good, path)
        wait_for(
            lambda: gw.metric("tuneops:served_version", model_name="retry-model", alias="production") == 2,
            "the repaired version to serve",
        )
        assert gw.metric("tuneops:alias_behind", model_name="retry-model", alias="production") == 0
        assert gw.get("/health/ready").json() == {"status": "ok"}
        assert gw.metric(
            "tuneops:adapter_loads_total", model_name="retry-model", version=bad.version, outcome="success"
        )


def test_failures_back_off_exponentially_up_to_the_limit_and_the_record_is_bounded(monkeypatch):
    from serve import versions

    now = [1000.0]
    monkeypatch.setattr(versions.time, "monotonic", lambda: now[0])
    log = versions.FailureLog(first_s=1.0, max_s=5.0, keep=3)
    waits = []
    for _ in range(5):
        failure = log.record(("m", "1"), "boom")
        waits.append(failure.retry_at - now[0])
        assert not log.due(("m", "1"))
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0] and log.get(("m", "1")).attempts == 5
    now[0] += 5.0
    assert log.due(("m", "1"))
    for v in "2345":
        log.record(("m", v), "boom")
    assert len(log) == 3 and log.get(("m", "1")) is None and log.get(("m", "5")) is not None
    log.clear(("m", "5"))
    assert log.get(("m", "5")) is None and log.due(("m", "5"))
