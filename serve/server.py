"""Run the gateway under uvicorn; SIGTERM turns readiness false and lets in-flight requests drain."""

from __future__ import annotations

import logging
import os
from typing import Any

import uvicorn

from serve.app import build_app
from serve.middleware import RequestIdFilter
from serve.settings import ServeSettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # our access log carries the request id


class GatewayServer(uvicorn.Server):
    """A uvicorn server whose exit signal first marks the gateway draining (readiness false)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        gateway = getattr(getattr(self.config.app, "state", None), "gateway", None)
        if gateway is not None:
            gateway.drain()
        super().handle_exit(sig, frame)


def make_server(settings: ServeSettings, port: int | None = None) -> GatewayServer:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        # Longer than clients' own idle timeout (5 s in httpx and the openai client), so the server never closes
        # a connection a client is about to reuse.
        timeout_keep_alive=75,
        access_log=False,
        lifespan="on",
    )
    return GatewayServer(config)


def serve(settings: ServeSettings) -> None:
    configure_logging()
    make_server(settings).run()
