"""One running gateway: the engine, the version directory and the alias watcher, and its phase.

Kept apart from the app factory (serve/app.py) and the routes (serve/api.py) so both depend on it and
neither on the other. The lifespan puts it on `app.state.gateway`; routes reach it with `gateway_of`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from serve.auth import KeyCheck
from serve.capture import TrafficCapture
from serve.engine import Engine
from serve.metrics import Metrics
from serve.serving import OpenAIServingChat, OpenAIServingCompletion
from serve.settings import ServeSettings
from serve.versions import VersionDirectory

log = logging.getLogger(__name__)


class Gateway:
    """Everything one running gateway holds, and its phase: starting, ready, draining."""

    def __init__(self, settings: ServeSettings, workdir: Path) -> None:
        self.settings = settings
        self.metrics = Metrics()
        limits = settings.limits
        self.engine = Engine(
            max_batch=limits.max_batch_size,
            max_queue=limits.max_queue,
            queue_timeout_s=limits.queue_timeout_s,
            metrics=self.metrics,
            max_prefill_tokens=limits.max_prefill_tokens,
            pack_weights=settings.pack_weights,
        )
        self.directory = VersionDirectory(settings, self.engine, self.metrics, workdir)
        self.chat = OpenAIServingChat(self.engine, self.directory, limits, settings.log_prompts)
        self.completion = OpenAIServingCompletion(self.engine, self.directory, limits, settings.log_prompts)
        self.keys = KeyCheck(settings.api_keys, settings.api_key_labels)
        self.capture = TrafficCapture.attach(self)
        self.draining = False
        self.startup_done = False
        self.metrics.ready.set_function(lambda: float(self.ready()))

    def ready(self) -> bool:
        return self.startup_done and not self.draining and self.directory.ready()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Readiness and the body /health/ready returns: its status, and any watched alias that is behind.

        An alias whose new version failed to load keeps serving the old one, so readiness stays true; `behind`
        names the alias, what it serves, the version it should serve, why that failed and when it is retried.
        """
        ok = self.ready()
        body: dict[str, Any] = {"status": "ok" if ok else "draining" if self.draining else "loading"}
        behind = self.directory.behind()
        if behind:
            body["behind"] = behind
        return ok, body

    def drain(self) -> None:
        """Readiness turns false and new requests are refused; admitted ones run to the end."""
        if not self.draining:
            log.info("draining: readiness is false, in-flight requests finish")
        self.draining = True
        self.engine.accepting = False

    async def run(self) -> None:
        """Load the production versions, then poll the registry for alias moves until cancelled."""
        try:
            await asyncio.to_thread(self.directory.start)
        except Exception:
            log.exception("startup failed; retrying every %ss", self.settings.poll_interval_s)
        self.startup_done = True
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                if not self.directory.started:
                    await asyncio.to_thread(self.directory.start)
                else:
                    await asyncio.to_thread(self.directory.refresh)
            except Exception:
                log.exception("registry poll failed")


def gateway_of(request: Any) -> Gateway:
    """The gateway the app's lifespan started (`app.state.gateway`)."""
    return request.app.state.gateway
