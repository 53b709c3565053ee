"""Each HTTP request (and WebSocket session) as a server span, `POST /v1/completions`, continuing the caller's
trace when it sent a W3C `traceparent`; its trace id is bound to the log context, so every line logged while the
request runs carries `trace_id`. Requests it submits to NATS carry the span onward (api/engine_client.py). Pure
ASGI, so streamed responses are inside the span until their last byte. With tracing off it is not installed."""

from __future__ import annotations

import structlog
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.tracing import extract_context, trace_id_of


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, tracer: Tracer):
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers", ())}
        status: dict[str, int] = {}

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with (
            self.tracer.start_as_current_span(
                f"{method} {scope['path']}",
                context=extract_context(headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope["path"]},
            ) as span,
            structlog.contextvars.bound_contextvars(trace_id=trace_id_of()),
        ):
            try:
                await self.app(scope, receive, send_noting_status)
            finally:
                route = scope.get("route")  # set by the router once it matched: a low-cardinality span name
                if route is not None and getattr(route, "path", None):
                    span.update_name(f"{method} {route.path}")
                    span.set_attribute("http.route", route.path)
                if "code" in status:
                    span.set_attribute("http.response.status_code", status["code"])
                    if status["code"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
