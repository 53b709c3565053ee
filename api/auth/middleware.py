"""Authentication, roles and request budgets for every HTTP request and WebSocket handshake, as a pure ASGI
middleware: it sees both scope types and runs before any router, so every route is covered, including routes
whose code knows nothing about auth. In order: public route → pass; who is calling (401); may that role call
this route (403); one request against the caller's minute and day (429 + Retry-After). Then the caller goes on
`request.state.caller` and its token meter on `request.state.meter`, and the response gets the rate-limit headers.

A refused WebSocket is closed before it is accepted (the client sees the handshake fail): 1008 (policy
violation) for 401/403, 1013 (try again later) for 429. On the Aleph Alpha routes a refusal has the status that
client understands (403 → 401, as docs/api.md promises), like every other error there."""

from __future__ import annotations

import nats.errors
import structlog
from nats.js import errors as jse
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from api.auth.caller import Caller
from api.auth.credentials import credential_from_headers
from api.auth.gate import AuthGate
from api.auth.headers import rate_limit_headers
from api.auth.metering import Meter, rate_limited
from api.auth.policy import PUBLIC, rule_for
from api.errors import ApiError, broker_error, error_response, use_aleph_statuses
from broker.errors import BrokerError, BrokerUnavailable
from contracts import ErrorCode
from contracts.accounts import Role

log = structlog.get_logger(__name__)

_WS_CLOSE_CODE = {401: 1008, 403: 1008, 429: 1013}


class AuthMiddleware:
    def __init__(self, app: ASGIApp, gate: AuthGate):
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        rule = rule_for(method, scope["path"])
        if rule.roles == PUBLIC:
            return await self.app(scope, receive, send)
        try:
            caller, meter = await self._admit(scope, rule.roles, rule.route_class)
        except ApiError as refusal:
            if rule.aleph:  # its client turns 401 into PermissionError; a 403 would be a bare RuntimeError
                use_aleph_statuses(HTTPConnection(scope))
            return await self._refuse(scope, receive, send, refusal)
        state = scope.setdefault("state", {})
        state["caller"], state["meter"] = caller, meter
        try:
            await self.app(scope, receive, _with_rate_headers(send, meter, self.gate))
        finally:
            if meter is not None:
                meter.finish()

    async def _admit(self, scope: Scope, roles: frozenset[Role], route_class: str) -> tuple[Caller, Meter | None]:
        """The caller and its meter, or the ApiError refusing the request."""
        try:
            headers = Headers(scope=scope)
            caller = await self.gate.caller_for(
                credential_from_headers(headers.get("authorization"), headers.get("x-api-key"))
            )
            if caller is None:
                raise ApiError(
                    ErrorCode.UNAUTHENTICATED,
                    "a valid API key or login token is required: send "
                    "`Authorization: Bearer <key>` (or `x-api-key: <key>`)",
                )
            if caller.role not in roles:
                log.info(
                    "auth.forbidden",
                    path=scope["path"],
                    caller=caller.name,
                    role=caller.role.value,
                    route_class=route_class,
                )
                raise ApiError(
                    ErrorCode.PERMISSION_DENIED, f"the {caller.role.value} role may not use {route_class} routes"
                )
            verdict = await self.gate.admit(caller)
        except BrokerError as exc:
            raise broker_error(exc) from exc
        except (nats.errors.Error, jse.APIError, TimeoutError) as exc:  # NATS unreachable or reconnecting
            raise broker_error(BrokerUnavailable(str(exc))) from exc
        meter = self.gate.meter_for(caller, verdict)
        if verdict is not None and not verdict.allowed:
            raise _RateLimited(rate_limited(verdict), meter)
        return caller, meter

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refusal: ApiError) -> None:
        if refusal.status == 401:
            log.info("auth.unauthenticated", path=scope["path"])
        if scope["type"] == "websocket":
            close_code = _WS_CLOSE_CODE.get(refusal.status, 1011)
            return await WebSocketClose(close_code, refusal.info.message[:120])(scope, receive, send)
        response = error_response(refusal, HTTPConnection(scope))
        if refusal.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        meter = refusal.meter if isinstance(refusal, _RateLimited) else None
        await response(scope, receive, _with_rate_headers(send, meter, self.gate))


class _RateLimited(ApiError):
    """A 429 that still reports the caller's windows in its headers."""

    def __init__(self, error: ApiError, meter: Meter | None):
        super().__init__(error.info.code, error.info.message, retry_after=error.retry_after)
        self.meter = meter


def _with_rate_headers(send: Send, meter: Meter | None, gate: AuthGate) -> Send:
    """`send`, adding the caller's rate-limit headers to the response start (or the WebSocket accept), computed
    then so they include what the request reserved so far."""
    if meter is None:
        return send

    async def sender(message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.accept") and meter.windows is not None:
            message.setdefault("headers", [])
            headers = MutableHeaders(scope=message)
            for name, value in rate_limit_headers(meter.limits, meter.windows, gate.clock()).items():
                headers[name] = value
        await send(message)

    return sender
