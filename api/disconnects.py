"""Work that ends when its client leaves: an HTTP request whose client disconnected, a WebSocket that closed.
Cancelling the work cancels any generation it iterates (so the worker stops). Below both the serving code and the
stream framing, which each use it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from api.errors import ApiError
from contracts import ErrorCode

T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so the generation on the worker) if the HTTP client disconnects first."""
    return await until_gone(_http_disconnect(request), work)


async def _http_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_gone(gone: Awaitable[object], work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so any generation it iterates) if `gone` completes first: the client left."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone)
    watcher.add_done_callback(lambda _: task.cancel())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ApiError(ErrorCode.CANCELLED, "the client disconnected") from None
        raise
    finally:
        watcher.cancel()
