"""Two gateway replicas on one PostgreSQL-backed MLflow server: a promotion and a rollback under client load.

Each replica polls the shared registry on its own; both must follow every alias move, and no request to either
may fail while they switch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Publisher, TrackingServer, _use_store
from test_serve_support import CHAT, Running, running_gateway, wait_for

from core.aliases import PASS
from tuneops.cli import run as cli

pytestmark = pytest.mark.integration

NAME = "replica-model"
POLL_S = 0.3  # test_serve_support's poll interval
SWITCH_BOUND_S = 10.0  # poll interval + one registry read over HTTP on a loaded CI machine


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tracking_server: TrackingServer):
    """The session's PostgreSQL-backed server, emptied, as this module's registry."""
    root = tmp_path_factory.mktemp("replicas")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        tracking_server.reset()
        _use_store(tracking_server.uri, mp)
        yield Publisher(tracking_server.uri, root, tiny_base)
    finally:
        mp.undo()


def answer(gw: Running, model: str) -> str:
    reply = gw.client().chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    return reply.choices[0].message.content or ""


class Load:
    """Clients that keep asking both replicas for the production version until stopped."""

    def __init__(self, replicas: list[Running], clients: int = 4) -> None:
        self.replicas = replicas
        self.answers: list[tuple[int, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        turn = i
        while not self._stop.is_set():
            replica = turn % len(self.replicas)
            turn += 1
            try:
                self.answers.append((replica, answer(self.replicas[replica], NAME)))
            except Exception as exc:  # every failure is counted, none ends the load
                self.failures.append(f"replica {replica}: {exc!r}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


@pytest.fixture(scope="module")
def replicas(shared: Publisher) -> Iterator[list[Running]]:
    shared.publish(NAME, seed=0, verdict=PASS, alias="production")
    shared.publish(NAME, seed=1, verdict=PASS)
    with running_gateway([NAME], expose="any") as one, running_gateway([NAME], expose="any") as two:
        yield [one, two]


def _switch_time(replicas: list[Running], version: int) -> float:
    start = time.monotonic()
    for gw in replicas:
        wait_for(
            lambda gw=gw: gw.metric("tuneops:served_version", model_name=NAME, alias="production") == version,
            f"every replica on version {version}",
        )
    return time.monotonic() - start


def test_a_promotion_and_a_rollback_reach_both_replicas_under_load_without_a_failed_request(replicas, capsys):
    one, two = replicas
    first = {gw.url: answer(gw, f"{NAME}/1") for gw in replicas}
    second = {gw.url: answer(gw, f"{NAME}/2") for gw in replicas}  # both versions loaded on both replicas
    assert first[one.url] == first[two.url] != second[one.url] == second[two.url]
    old, new = first[one.url], second[one.url]

    with Load(replicas) as load:
        wait_for(lambda: len(load.answers) >= 8, "load on both replicas")
        assert cli(["promote", NAME, "2"]) == 0
        promoted_in = _switch_time(replicas, 2)
        for gw in replicas:
            wait_for(lambda gw=gw: answer(gw, NAME) == new, "the new version's answer")
        during = len(load.answers)
        wait_for(lambda: len(load.answers) >= during + 8, "load after the promotion")
        assert cli(["rollback", NAME]) == 0
        rolled_back_in = _switch_time(replicas, 1)
        for gw in replicas:
            wait_for(lambda gw=gw: answer(gw, NAME) == old, "the rolled-back version's answer")
        after = len(load.answers)
        wait_for(lambda: len(load.answers) >= after + 8, "load after the rollback")

    assert load.failures == []
    assert {text for _, text in load.answers} == {old, new}
    assert {replica for replica, _ in load.answers} == {0, 1}
    assert promoted_in < SWITCH_BOUND_S and rolled_back_in < SWITCH_BOUND_S, (promoted_in, rolled_back_in)
    assert "replica-model@production -> 1 (was 2)" in capsys.readouterr().out
