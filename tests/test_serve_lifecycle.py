"""Promotion, rollback and failed promotion under load, readiness, disconnects and drain (tiny model).

These gateways let clients name any version (`expose: any`): the tests compare unevaluated versions by number.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve_support import CHAT, running_gateway, wait_for


def answer(client, model, max_tokens=24):
    return (
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, temperature=0)
        .choices[0]
        .message.content
    )


@pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)
def test_promotion_and_rollback_switch_while_requests_in_flight_finish_on_the_old_version(store):
    v1 = store.publish("promo-model", seed=0, alias="production")
    v2 = store.publish("promo-model", seed=1)
    with running_gateway(["promo-model"], expose="any", limits={"max_tokens": 400}) as gw:
        client = gw.client()
        old = {n: answer(client, f"promo-model/{v1.version}", n) for n in (24, 120)}
        new = answer(client, f"promo-model/{v2.version}")
        assert old[24] != new and answer(client, "promo-model") == old[24]

        streams = [
            client.chat.completions.create(
                model="promo-model", messages=CHAT, max_tokens=120, temperature=0, stream=True
            )
            for _ in range(3)
        ]
        firsts = [next(iter(s)) for s in streams]  # admitted on version 1

        switches = gw.metric("tuneops:alias_switches_total", model_name="promo-model", outcome="success")
        store.move("promo-model", "production", v2.version)
        with ThreadPoolExecutor(4) as pool:  # requests keep arriving during the switch; none may fail
            during = [pool.submit(answer, client, "promo-model") for _ in range(8)]
            wait_for(lambda: answer(client, "promo-model") == new, "the switch to version 2")
            assert {f.result() for f in during} <= {old[24], new}
        for first, stream in zip(firsts, streams, strict=True):
            text = (first.choices[0].delta.content or "") + "".join(
                c.choices[0].delta.content or "" for c in stream if c.choices
            )
            assert text == old[120]
        assert gw.metric("tuneops:served_version", model_name="promo-model", alias="production") == 2

        store.move("promo-model", "production", v1.version)  # rollback: v1 is still loaded
        wait_for(lambda: answer(client, "promo-model") == old[24], "the rollback to version 1")
        assert gw.metric("tuneops:alias_switches_total", model_name="promo-model", outcome="success") == switches + 2


@pytest.mark.parametrize("broken", ["weights", "nan"])
def test_a_version_that_fails_to_load_or_check_leaves_the_old_one_serving(store, broken):
    name = f"fail-{broken}"
    v1 = store.publish(name, seed=0, alias="production")
    with running_gateway([name], expose="any") as gw:
        client = gw.client()
        before = answer(client, name)
        bad = store.publish(name, seed=5, broken=broken)
        store.move(name, "production", bad.version)
        wait_for(
            lambda: gw.metric("tuneops:alias_switches_total", model_name=name, outcome="failure") >= 1,
            "the failed switch",
        )
        assert gw.metric("tuneops:adapter_loads_total", model_name=name, version=bad.version, outcome="failure") >= 1
        assert answer(client, name) == before and gw.ready()
        assert gw.metric("tuneops:served_version", model_name=name, alias="production") == int(v1.version)
        assert gw.metric("tuneops:alias_behind", model_name=name, alias="production") == 1
        assert gw.metric("tuneops:adapter_loads_total", model_name=name, version=bad.version, outcome="success") == 0
        with pytest.raises(Exception) as err:  # asking for the broken version by number is refused clearly
            answer(client, f"{name}/{bad.version}")
        assert getattr(err.value, "status_code", None) == 404


def test_not_ready_until_a_production_version_exists_then_follows_the_registry(store):
    import openai

    v = store.publish("late-model", seed=0)
    with running_gateway(["late-model"], wait_ready=False) as gw:
        wait_for(lambda: gw.get("/health/startup").status_code == 200, "startup")
        assert gw.get("/health/live").status_code == 200
        assert gw.get("/health/ready").status_code == 503
        with pytest.raises(openai.InternalServerError) as err:
            gw.client().chat.completions.create(model="late-model", messages=CHAT, max_tokens=2)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        store.move("late-model", "production", v.version)
        wait_for(gw.ready, "readiness after the alias was set")
        assert answer(gw.client(), "late-model", 4)


def test_a_client_that_disconnects_stops_its_generation(store):
    store.publish("gone-model", seed=0, alias="production")
    with running_gateway(["gone-model"], limits={"max_tokens": 1800}) as gw:
        client = gw.client()
        stream = client.chat.completions.create(model="gone-model", messages=CHAT, max_tokens=1800, stream=True)
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.close()
        wait_for(lambda: gw.metric("tuneops:num_requests_running") == 0, "the abandoned request to leave")
        assert gw.metric("tuneops:generation_tokens_total") < 1800
        assert gw.metric("tuneops:request_success_total") == 0  # the warm-up is not a request
        # The non-streaming path notices a disconnect too.
        import httpx

        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.url + "/v1/chat/completions",
                timeout=1.0,
                json={"model": "gone-model", "messages": CHAT, "max_tokens": 1800},
            )
        wait_for(lambda: gw.metric("tuneops:num_requests_running") == 0, "the abandoned request to leave")
        assert gw.metric("tuneops:request_success_total") == 0
        assert gw.metric("tuneops:generation_tokens_total") < 2 * 1800


def test_sigterm_turns_readiness_false_and_drains_in_flight_requests(store):
    store.publish("drain-model", seed=0, alias="production")
    with running_gateway(["drain-model"], limits={"max_tokens": 120}) as gw:
        client = gw.client()
        stream = client.chat.completions.create(
            model="drain-model",
            messages=CHAT,
            max_tokens=120,
            stream=True,
            stream_options={"include_usage": True},
        )
        it = iter(stream)
        next(it)
        gw.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert not gw.gateway.ready()
        chunks = list(it)
        assert chunks[-1].usage.completion_tokens == 120
        gw.thread.join(30)
        assert not gw.thread.is_alive()


def test_least_recently_used_versions_are_unloaded_beyond_the_limit_and_reload_on_demand(store):
    store.publish("lru-model", seed=0, alias="production")
    store.publish("lru-model", seed=1)
    store.publish("lru-model", seed=2)
    store.publish("lru-model", seed=3)
    bad = store.publish("lru-model", seed=4, broken="weights")
    with running_gateway(["lru-model"], max_loaded_adapters=2, expose="any") as gw:
        client = gw.client()
        work = gw.gateway.directory.workdir / "lru-model"

        def folders() -> set[str]:  # downloaded version folders: only those of loaded versions stay
            return {p.name for p in work.iterdir()}

        first = {v: answer(client, f"lru-model/{v}", 8) for v in ("2", "3")}  # 3 evicts 2 (1 is production)
        assert first["2"] != first["3"] and folders() == {"1", "3"}
        assert answer(client, "lru-model/2", 8) == first["2"]  # loaded again, same answer
        assert gw.metric("tuneops:adapter_loads_total", model_name="lru-model", version="2", outcome="success") == 2
        assert answer(client, "lru-model", 8) == answer(client, "lru-model/1", 8)
        assert answer(client, "lru-model/4", 8) and folders() == {"1", "4"}
        with pytest.raises(Exception) as err:
            answer(client, f"lru-model/{bad.version}")
        assert getattr(err.value, "status_code", None) == 404 and folders() == {"1", "4"}
