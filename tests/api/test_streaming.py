"""Stream framing and the cancel-on-leave helper, without a server."""

from __future__ import annotations

import asyncio

import pytest

from api.disconnects import until_gone
from api.errors import ApiError
from api.streaming import primed, sse_frames
from contracts import ErrorCode

pytestmark = pytest.mark.asyncio


async def chunks(*items: dict, fail: ApiError | None = None):
    for item in items:
        yield item
    if fail is not None:
        raise fail


async def test_sse_frames_with_and_without_the_done_terminator() -> None:
    assert [f async for f in sse_frames(chunks({"a": 1}))] == ['data: {"a":1}\n\n', "data: [DONE]\n\n"]
    failing = chunks({"a": 1}, fail=ApiError(ErrorCode.WORKER_LOST, "gone"))
    frames = [f async for f in sse_frames(failing, done=False, error_event=lambda e: {"type": "error"})]
    assert frames == ['data: {"a":1}\n\n', 'data: {"type":"error"}\n\n']


async def test_primed_raises_before_the_first_chunk_and_replays_it_after() -> None:
    with pytest.raises(ApiError):
        await primed(chunks(fail=ApiError(ErrorCode.NO_WORKER, "none")))
    assert [c async for c in await primed(chunks({"a": 1}, {"b": 2}))] == [{"a": 1}, {"b": 2}]
    assert [c async for c in await primed(chunks())] == []


async def test_until_gone_cancels_the_work_when_the_client_leaves() -> None:
    gone = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cancelled.set()

    asyncio.get_running_loop().call_later(0.05, gone.set)
    with pytest.raises(ApiError) as raised:
        await until_gone(gone.wait(), work())
    assert raised.value.info.code == ErrorCode.CANCELLED and cancelled.is_set()
    assert await until_gone(asyncio.Event().wait(), asyncio.sleep(0, "done")) == "done"
