"""What every runner of a job queue (batch jobs, background responses) does with its tickets: pull them while
it has room, and heartbeat each one it works on so the consumer's ack wait never hands it to another runner
while this one is alive."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg

from broker.batch_store import JobQueue

log = structlog.get_logger(__name__)


def heartbeat_interval(queue: JobQueue) -> float:
    """Well inside the ack wait even if another replica configured the shared consumer with a shorter one."""
    return max(0.5, min(queue.ack_wait_s / 3, 2.0))


async def pull_tickets(
    queue: JobQueue, handle: Callable[[Msg], Awaitable[None]], running: set[asyncio.Task], max_running: int, name: str
) -> None:
    """Forever: fetch the next ticket when fewer than `max_running` are handled, and handle it in a task kept
    in `running` (so the owner can cancel them all)."""
    while True:
        if len(running) >= max_running:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            msg = await queue.fetch(timeout=1.0)
        except Exception as exc:  # NATS reconnecting: keep pulling once it is back
            log.warning(f"{name}.fetch_failed", error=str(exc))
            await asyncio.sleep(1.0)
            continue
        if msg is not None:
            task = asyncio.create_task(handle(msg))
            running.add(task)
            task.add_done_callback(running.discard)


async def keep_alive(msg: Msg, interval_s: float, name: str) -> None:
    """Heartbeat the ticket until cancelled. A missed beat only risks a takeover, which each runner makes safe."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await msg.in_progress()
        except Exception as exc:
            log.warning(f"{name}.heartbeat_failed", error=str(exc))
