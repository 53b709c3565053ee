"""The only place that knows SSE framing: `data: <json>` events, error events mid-stream, `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import structlog
from fastapi.responses import StreamingResponse

from api.errors import ApiError, api_error_body

log = structlog.get_logger(__name__)

DONE = "[DONE]"


def sse_data(payload: dict | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return f"data: {body}\n\n"


async def sse_frames(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Frame chunk objects; a failure after headers were sent becomes an error event (status stays 200)."""
    try:
        async for chunk in chunks:
            yield sse_data(chunk)
    except ApiError as exc:
        yield sse_data(api_error_body(exc))
    yield sse_data(DONE)


def sse_response(chunks: AsyncIterator[dict]) -> StreamingResponse:
    return StreamingResponse(
        sse_frames(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
