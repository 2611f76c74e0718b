"""The gateway app factory: a lifespan that starts a `Gateway` (serve/gateway.py) and stops it draining.

State lives on `app.state.gateway`; routes (serve/api.py) only translate HTTP to `OpenAIServing` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from serve.api import router
from serve.errors import install_handlers
from serve.gateway import Gateway
from serve.middleware import GatewayMiddleware
from serve.settings import ServeSettings


def build_app(settings: ServeSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with tempfile.TemporaryDirectory(prefix="tuneops-serve-") as tmp:
            gateway = Gateway(settings, Path(tmp))
            app.state.gateway = gateway
            gateway.engine.start()
            tasks = [asyncio.create_task(gateway.run())]
            try:
                yield
            finally:
                gateway.drain()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.to_thread(gateway.engine.stop)
                await asyncio.to_thread(gateway.capture.close)

    app = FastAPI(title="tuneops gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    return app
