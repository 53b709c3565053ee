"""common/tasks.py: a stop that waits for a cancelled loop returns even when the loop lost its cancel."""

from __future__ import annotations

import asyncio

import pytest

from common import tasks
from common.tasks import cancel_and_wait

pytestmark = pytest.mark.asyncio


async def test_a_cancel_lost_in_wait_for_is_repeated_until_the_loop_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reads a queue through wait_for, as nats-py's next_msg does. An item and the cancel arrive in the
    same step: on Python 3.11 wait_for returns the item and the cancel is gone; a single cancel never ends it."""
    monkeypatch.setattr(tasks, "RECANCEL_AFTER_S", 0.05)
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def loop() -> None:
        while True:
            try:
                await asyncio.wait_for(queue.get(), timeout=5)
            except TimeoutError:
                continue

    reader = asyncio.create_task(loop(), name="reader")
    await asyncio.sleep(0)  # the loop waits in wait_for
    queue.put_nowait(1)  # wakes it in the same step as the cancel below
    async with asyncio.timeout(5):
        await cancel_and_wait(reader)
    assert reader.done()


async def test_a_task_that_ignores_one_cancel_is_cancelled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_AFTER_S", 0.05)
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels == 2:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, None)
    assert task.cancelled() and cancels == 2


async def test_a_failed_task_s_exception_is_retrieved_and_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # no raise, and no "exception was never retrieved" at garbage collection
    assert isinstance(task.exception(), RuntimeError)
