"""Stopping background tasks for certain.

One `task.cancel()` can be lost on Python 3.11: `asyncio.wait_for`, which nats-py uses under every `next_msg`,
`fetch` and request, returns a result that arrived in the same loop step as the cancel instead of raising it. A
loop that reads NATS then simply goes on, and whoever awaits it after the cancel waits for ever (CI saw a test
hang for its whole 300 s timeout this way, in the max-deliveries watcher's stop). So the cancel is repeated
until the task has ended."""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger(__name__)

RECANCEL_AFTER_S = 1.0  # longer than any clean-up a cancelled task of ours does in its `finally`


async def cancel_and_wait(*tasks: asyncio.Task | asyncio.Future | None) -> None:
    """Cancel `tasks` (None entries are skipped) and return once every one has ended, cancelling again each
    RECANCEL_AFTER_S a task runs on. Their results and exceptions are dropped, as `gather(return_exceptions=True)`
    would."""
    pending = {task for task in tasks if task is not None}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER_S)
        if pending:
            log.info("task.cancel_lost", tasks=sorted(task.get_name() for task in pending if hasattr(task, "get_name")))
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: asyncio would otherwise log "exception was never retrieved"
