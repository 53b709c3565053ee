"""Connecting to NATS: one lifecycle as an async context manager (reconnect forever, drain on exit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import structlog
from nats.aio.client import Client as NatsClient

log = structlog.get_logger(__name__)


@asynccontextmanager
async def connect(url: str, name: str) -> AsyncIterator[NatsClient]:
    """Connect to `url` (comma-separated for a cluster) and drain the connection on exit."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats.error", error=str(exc), client=name)

    async def on_disconnect() -> None:
        log.warning("nats.disconnected", client=name)

    async def on_reconnect() -> None:
        log.info("nats.reconnected", client=name, url=str(nc.connected_url.geturl() if nc.connected_url else ""))

    nc = await nats.connect(
        servers=[server.strip() for server in url.split(",") if server.strip()],
        name=name,
        connect_timeout=5,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        ping_interval=20,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    try:
        yield nc
    finally:
        if not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # a drain that fails at shutdown must not mask the real exit path
                log.warning("nats.drain_failed", error=str(exc), client=name)
