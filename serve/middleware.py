"""ASGI middleware: a request id on every response and log line, the body size limit, and an access log.

It wraps the app as plain ASGI, so streamed responses pass through untouched and a body over the limit is
refused before the route reads it (the 413 is rendered by `serve.errors`).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import Any

from serve.errors import APIError, PayloadTooLarge, render

log = logging.getLogger("tuneops.access")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _TooLarge(PayloadTooLarge):
    """Raised from `receive` when a chunked body outgrows the limit; the route's handler maps it to 413."""


class GatewayMiddleware:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        rid = incoming if SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = [0]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def error(exc: APIError) -> None:
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": exc.status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send_with_id({"type": "http.response.body", "body": render(exc)})

        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await error(PayloadTooLarge(self.max_body_bytes))
                return
            seen = [0]

            async def counted_receive() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body_bytes:
                        raise _TooLarge(self.max_body_bytes)
                return message

            await self.app(scope, counted_receive, send_with_id)
        finally:
            if scope["path"] not in ("/health/live", "/health/ready", "/health/startup", "/metrics"):
                log.info("%s %s %s %.3fs", scope["method"], scope["path"], status[0], time.perf_counter() - started)
            request_id.reset(token)
