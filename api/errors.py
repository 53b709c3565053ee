"""Errors, mapped to HTTP in one place and rendered in the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`, or on the Anthropic routes (`/v1/messages…`) in Anthropic's
`{"type": "error", "error": {"type", "message"}}`, which its SDK parses."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection

from broker.errors import BrokerError, BrokerUnavailable, MessageTooLarge, QueueFull, QueueMissing
from contracts import ErrorCode, ErrorInfo

log = structlog.get_logger(__name__)

STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.WORKER_LOST: 503,
    ErrorCode.WORKER_CRASHED: 500,  # retrying would only kill more workers
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.RATE_LIMITED: 429,
}

# Starlette's own refusals (unknown route, wrong method, a body over its limit while reading) get a code too.
_CODE_BY_HTTP_STATUS = {
    404: ErrorCode.NOT_FOUND.value,
    405: ErrorCode.INVALID_REQUEST.value,
    413: ErrorCode.PAYLOAD_TOO_LARGE.value,
}

# OpenAI's `type` vocabulary, which its SDKs and users key on.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """Anything the edge refuses or cannot do, with a machine code; the status follows from the code."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        details: dict | None = None,
    ):
        super().__init__(message)
        self.info = ErrorInfo(code=code, message=message, param=param)
        self.retry_after = retry_after
        self.details = details  # Anthropic's machine-readable `error.details`, which its SDK acts on

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ApiError:
        return cls(info.code, info.message, param=info.param)

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.info.code]


# The aleph-alpha-client raises typed errors for 400/401/402/408/503 and retries 408/429/5xx; anything else is a
# bare RuntimeError. On its routes, statuses outside that set become the nearest one it understands.
_ALEPH_STATUS = {403: 401, 404: 400, 409: 400, 413: 400, 504: 408}


def use_aleph_statuses(connection: HTTPConnection) -> None:
    """Mark this request as Aleph Alpha's: its errors get statuses from the client's vocabulary."""
    connection.state.error_statuses = _ALEPH_STATUS


def status_for(exc: ApiError, connection: HTTPConnection | None = None) -> int:
    overrides = getattr(connection.state, "error_statuses", {}) if connection is not None else {}
    return overrides.get(exc.status, exc.status)


def error_body(status: int, message: str, *, code: str | None, param: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": _TYPE_BY_STATUS.get(status, "api_error"), "param": param, "code": code}
    }


ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's `type` vocabulary (its SDKs map statuses to exception classes; the type is what users read): the
# same words as OpenAI's for client errors, its own for the rest.
_ANTHROPIC_TYPE_BY_STATUS = _TYPE_BY_STATUS | {
    413: "request_too_large",
    499: "api_error",
    500: "api_error",
    503: "overloaded_error",
}


def anthropic_error_body(status: int, message: str, details: dict | None = None) -> dict:
    error = {"type": _ANTHROPIC_TYPE_BY_STATUS.get(status, "api_error"), "message": message}
    return {"type": "error", "error": {**error, "details": details} if details else error}


def _is_anthropic(connection: HTTPConnection | None) -> bool:
    path = connection.url.path if connection is not None else ""
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def _error_json(
    connection: HTTPConnection | None,
    status: int,
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    details: dict | None = None,
) -> dict:
    """The error body in the shape of the API the request was made to."""
    if _is_anthropic(connection):
        return anthropic_error_body(status, message, details)
    return error_body(status, message, code=code, param=param)


def api_error_body(exc: ApiError, status: int | None = None) -> dict:
    return error_body(status or exc.status, exc.info.message, code=exc.info.code.value, param=exc.info.param)


def broker_error(exc: BrokerError, *, retry_after: float | None = None) -> ApiError:
    """`retry_after` overrides the default wait a client is told (e.g. a full queue's expected drain time)."""
    if isinstance(exc, QueueFull):
        return ApiError(ErrorCode.QUEUE_FULL, str(exc) + "; retry later", retry_after=retry_after or 1.0)
    if isinstance(exc, QueueMissing):
        return ApiError(ErrorCode.NO_WORKER, str(exc))
    if isinstance(exc, MessageTooLarge):
        return ApiError(ErrorCode.PAYLOAD_TOO_LARGE, "the request is too large to queue")
    if isinstance(exc, BrokerUnavailable):
        return ApiError(ErrorCode.UNAVAILABLE, "the request queue is unavailable; retry later", retry_after=1.0)
    return ApiError(ErrorCode.UNAVAILABLE, str(exc))


def as_api_error(exc: Exception) -> ApiError:
    """Whatever a request can fail with, as the ApiError the HTTP handlers would render (for WebSocket frames)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BrokerError):
        return broker_error(exc)
    if isinstance(exc, ValidationError | RequestValidationError):
        message, param = validation_message(exc)
        return ApiError(ErrorCode.INVALID_REQUEST, message, param=param)
    log.error("api.unhandled_error", exc_info=exc)
    return ApiError(ErrorCode.INTERNAL, "internal error")


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """The first problem, phrased for a human, and the parameter it concerns."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def _render(exc: ApiError, request: HTTPConnection | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
    status = status_for(exc, request)
    body = _error_json(
        request, status, exc.info.message, code=exc.info.code.value, param=exc.info.param, details=exc.details
    )
    return JSONResponse(body, status_code=status, headers=headers)


error_response = _render  # for middleware, which answers before any route (and its handlers) runs


def install_error_handlers(app: FastAPI) -> None:
    # Refusals, queue failures, invalid bodies: one mapping (as_api_error), one rendering.
    @app.exception_handler(ApiError)
    @app.exception_handler(BrokerError)
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def on_request_error(request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        if error.status >= 500:  # our side failed (NATS, workers): worth a line, with what caused it
            log.warning(
                "api.server_error", path=request.url.path, code=error.info.code.value, cause=repr(exc.__cause__ or exc)
            )
        return _render(error, request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODE_BY_HTTP_STATUS.get(exc.status_code)
        return JSONResponse(
            _error_json(request, exc.status_code, str(exc.detail), code=code),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("api.unhandled_error")
        return JSONResponse(_error_json(request, 500, "internal error", code=ErrorCode.INTERNAL.value), 500)
