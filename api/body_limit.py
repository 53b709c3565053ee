"""Request bodies over their limit get a 413 in the API's error shape: at once when Content-Length announces it,
and while reading when it does not (chunked uploads), so no body is read past its limit."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response
from contracts import ErrorCode

# path -> (limit in bytes, the message a client gets when over it)
LimitFor = Callable[[str], tuple[int, str]]


class BodySizeLimit:
    def __init__(self, app: ASGIApp, limit_for: LimitFor):
        self.app = app
        self._limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message = self._limit_for(scope["path"])
        announced = dict(scope["headers"]).get(b"content-length", b"")
        if announced.isdigit() and int(announced) > limit:
            await error_response(ApiError(ErrorCode.PAYLOAD_TOO_LARGE, message), HTTPConnection(scope))(
                scope, receive, send
            )
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read: FastAPI passes an HTTPException on to the handlers
                    # (api/errors.py), which answer 413 in the API's shape.
                    raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)
