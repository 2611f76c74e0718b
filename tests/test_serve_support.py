"""Helpers for the gateway tests: a real uvicorn server on loopback in a thread, with the official client.

Imported by the other test_serve_* modules (pytest puts tests/ on sys.path); it holds no tests and no fixtures
(the `store` of versions they serve is in conftest.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

CHAT = [{"role": "user", "content": "What is a building permit?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until `check()` is truthy; a bounded wait for a state, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    def __init__(self, server: Any, thread: threading.Thread, port: int) -> None:
        self.server = server
        self.thread = thread
        self.url = f"http://127.0.0.1:{port}"

    @property
    def gateway(self) -> Any:
        return self.server.config.app.state.gateway

    def client(self, api_key: str = "unused", **kwargs: Any) -> Any:
        from openai import OpenAI

        kwargs.setdefault("max_retries", 0)
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching the labels, read from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def ready(self) -> bool:
        try:
            return self.get("/health/ready").status_code == 200
        except httpx.HTTPError:
            return False


@contextmanager
def running_gateway(models: list[str], wait_ready: bool = True, **overrides: Any) -> Iterator[Running]:
    from serve.server import make_server
    from serve.settings import ServeSettings

    limits = {"max_batch_size": 8, "max_queue": 16, "max_tokens": 256, "default_max_tokens": 16}
    limits.update(overrides.pop("limits", {}))
    overrides.setdefault("dtype", "fp32")  # exact comparisons across batch shapes
    settings = ServeSettings(models=models, poll_interval_s=0.3, limits=limits, **overrides)
    port = free_port()
    server = make_server(settings, port=port)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    running = Running(server, thread, port)
    try:
        wait_for(lambda: server.started, "the server to start")
        if wait_ready:
            wait_for(running.ready, "readiness")
        yield running
    finally:
        server.should_exit = True
        thread.join(30)
