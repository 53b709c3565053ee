"""The only place that knows stream framing. SSE: `data: <json>` events, error events mid-stream, `data: [DONE]`.
WebSocket: one JSON text message per chunk, an `{"error": …}` message on failure, `[DONE]` after every request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import structlog
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from api.disconnects import until_gone
from api.errors import ApiError, api_error_body, as_api_error
from contracts import ErrorCode

log = structlog.get_logger(__name__)

T = TypeVar("T")
DONE = "[DONE]"
ErrorEvent = Callable[[ApiError], dict]


def _json(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def sse_data(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else _json(payload)}\n\n"


@dataclass(frozen=True, slots=True)
class EventIds:
    """SSE `id:` fields `<request_id>/<chunk index>`, which a client sends back as Last-Event-ID to resume; a
    resumed stream (replayed from its first chunk) leaves out the chunks up to `after`."""

    request_id: str
    after: int = -1


async def sse_frames(
    chunks: AsyncIterator[dict],
    *,
    done: bool = True,
    error_event: ErrorEvent = api_error_body,
    event_ids: EventIds | None = None,
) -> AsyncIterator[str]:
    """Frame chunk objects; a failure after headers were sent becomes an error event (status stays 200)."""
    try:
        index = -1
        async for chunk in chunks:
            index += 1
            if event_ids is None:
                yield sse_data(chunk)
            elif index > event_ids.after:
                yield f"id: {event_ids.request_id}/{index}\n{sse_data(chunk)}"
    except ApiError as exc:
        yield sse_data(error_event(exc))
    if done:
        yield sse_data(DONE)


def sse_response(
    chunks: AsyncIterator[dict],
    *,
    done: bool = True,
    error_event: ErrorEvent = api_error_body,
    event_ids: EventIds | None = None,
) -> StreamingResponse:
    """`done=False` for protocols without the OpenAI terminator (Aleph Alpha's stream has none)."""
    return StreamingResponse(
        sse_frames(chunks, done=done, error_event=error_event, event_ids=event_ids),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def primed(chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first chunk before the response starts, so a failure before any output (no worker, queue
    timeout) is a real HTTP status that clients retry on rather than an error event inside a 200."""
    iterator = aiter(chunks)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return _replay([], iterator)
    return _replay([first], iterator)


async def _replay(head: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in head:
        yield item
    async for item in rest:
        yield item


# --- WebSocket ------------------------------------------------------------------------------------------------

StartStream = Callable[[dict], Awaitable[AsyncIterator[dict]]]


class _SocketGone(Exception):
    """Sending failed because the client closed the socket."""


MAX_WAITING_MESSAGES = 32  # beyond this the socket is not read until a request finishes (back-pressure)


async def websocket_session(ws: WebSocket, start: StartStream, *, max_bytes: int) -> None:
    """Serve requests one after another on one socket. Each text (or UTF-8 binary) message is a request object;
    `start` submits it and returns its chunk stream. A request the socket closes under is cancelled."""
    await ws.accept()
    inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(MAX_WAITING_MESSAGES)
    closed = asyncio.Event()
    reader = asyncio.create_task(_read(ws, inbox, closed))
    try:
        while (message := await inbox.get()) is not None:
            try:
                await until_gone(closed.wait(), _answer(ws, message, start, max_bytes))
            except (ApiError, _SocketGone):  # the client left mid-request; its generation was closed
                break
    finally:
        reader.cancel()
        if ws.client_state == WebSocketState.CONNECTED:
            await _close_quietly(ws)


async def _read(ws: WebSocket, inbox: asyncio.Queue[str | bytes | None], closed: asyncio.Event) -> None:
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            await inbox.put(message["text"] if message.get("text") is not None else message.get("bytes") or b"")
    finally:
        closed.set()
        if inbox.full():  # make room for the end marker: nothing queued will be answered on a closed socket
            inbox.get_nowait()
        inbox.put_nowait(None)


async def _answer(ws: WebSocket, message: str | bytes, start: StartStream, max_bytes: int) -> None:
    """One request: its chunks, or an error message, then `[DONE]`; the connection stays usable either way."""
    try:
        chunks = await start(_request_object(message, max_bytes))
        async with aclosing(chunks):  # leaving early must close the generation (cancel on the worker)
            async for chunk in chunks:
                await _send(ws, _json(chunk))
    except _SocketGone:
        raise
    except Exception as exc:  # every failure of one request becomes its error message
        await _send(ws, _json(api_error_body(as_api_error(exc))))
    await _send(ws, DONE)


async def _send(ws: WebSocket, text: str) -> None:
    try:
        await ws.send_text(text)
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        raise _SocketGone from exc


def _request_object(message: str | bytes, max_bytes: int) -> dict:
    if len(message.encode() if isinstance(message, str) else message) > max_bytes:  # as for an HTTP body
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, f"the request exceeds {max_bytes} bytes")
    try:
        payload = json.loads(message)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ApiError(
            ErrorCode.INVALID_REQUEST, "the message is not valid JSON: send one request object per message"
        ) from exc
    if not isinstance(payload, dict):
        raise ApiError(ErrorCode.INVALID_REQUEST, "the message must be a JSON object (a request body)")
    return payload


async def _close_quietly(ws: WebSocket) -> None:
    try:
        await ws.close()
    except (RuntimeError, OSError) as exc:  # already going away
        log.debug("websocket.close_failed", error=str(exc))
