"""Watch what the edge publishes on NATS (requests, cancels) the way any other subscriber would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from broker.connection import connect

T = TypeVar("T")


@asynccontextmanager
async def observed(nats_url: str, subject: str, parse: Callable[[bytes], T]) -> AsyncIterator[asyncio.Queue[T]]:
    """The messages published on `subject` while the block runs, parsed, in arrival order."""
    async with connect(nats_url, f"observer-{subject}") as nc:
        messages: asyncio.Queue[T] = asyncio.Queue()

        async def on_message(msg) -> None:
            await messages.put(parse(msg.data))

        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        yield messages
