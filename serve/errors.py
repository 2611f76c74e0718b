"""Every error the gateway returns, in OpenAI's shape, mapped to HTTP in one place (`install_handlers`).

Routes and the engine raise `APIError` subclasses; nothing else decides a status code. Unexpected exceptions
become a generic 500 whose body carries no stack trace (the trace goes to the log with the request id).
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class Unsupported(InvalidRequest):
    """A parameter the gateway cannot honour: refused by name, never silently ignored."""

    code = "unsupported_parameter"

    def __init__(self, param: str, why: str = "is not supported by this server") -> None:
        super().__init__(f"'{param}' {why}", param=param)


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidAPIKey(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.")


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, why: str = "does not exist or is not served here") -> None:
        super().__init__(f"The model '{model}' {why}.", param="model")


class CompletionNotFound(APIError):
    """Feedback names a completion with no trace: unknown, not sampled, or captured by no gateway."""

    status = 404
    type = "invalid_request_error"
    code = "completion_not_found"

    def __init__(self, completion_id: str) -> None:
        super().__init__(
            f"No captured completion has the id '{completion_id}' (unknown, or not kept by capture.sample_rate).",
            param="completion_id",
        )


class RouteNotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body exceeds the limit of {limit} bytes.")


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("The server is at capacity; retry later.", headers={"Retry-After": str(max(1, retry_after_s))})


class NotReady(APIError):
    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str = "The server is not ready.", retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class QueueTimeout(NotReady):
    code = "queue_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"The request waited more than {timeout_s:g} s in the queue.")


class TrackingUnavailable(NotReady):
    """The tracking server that stores traces and feedback cannot be reached or refused the write."""

    code = "tracking_unavailable"


class EngineFailure(APIError):
    code = "internal_error"


def render(error: APIError) -> bytes:
    return json.dumps(error.body()).encode()


def sse_event(error: APIError) -> str:
    """The final event of a stream that failed after its headers were sent."""
    return f"data: {json.dumps(error.body())}\n\n"


def install_handlers(app: Any) -> None:
    """Map every exception that can leave a route to an OpenAI-shaped JSON response."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import Response

    def respond(error: APIError) -> Response:
        return Response(render(error), status_code=error.status, media_type="application/json", headers=error.headers)

    async def api_error(_request: Any, exc: APIError) -> Response:
        return respond(exc)

    async def validation_error(_request: Any, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return respond(InvalidRequest(str(first.get("msg", "invalid request")), param=param))

    async def http_error(_request: Any, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return respond(RouteNotFound("No such route."))
        if exc.status_code == 405:
            return respond(MethodNotAllowed("Method not allowed on this route."))
        error = APIError(str(exc.detail))
        error.status = exc.status_code
        return respond(error)

    async def unexpected(request: Any, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return respond(EngineFailure("The server had an error while processing the request."))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
