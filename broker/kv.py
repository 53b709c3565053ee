"""KV reads every store shares. nats-py's KV API raises for a missing or deleted key and for an empty listing
(and `keys()` filters by substring), so these answer None / [] instead."""

from __future__ import annotations

from typing import TypeVar

import structlog
from nats.js import errors as jse
from nats.js.kv import KeyValue
from pydantic import ValidationError

from contracts import Contract

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=Contract)


async def read(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    """The value and its revision (the one a compare-and-swap names), or None if there is none."""
    try:
        entry = await kv.get(key)
    except (jse.KeyNotFoundError, jse.KeyDeletedError):
        return None
    return (entry.value, entry.revision) if entry.value else None


async def records(kv: KeyValue, prefix: str, kind: type[R]) -> list[R]:
    """Every live record under `prefix.>`, read in one watch; unreadable ones are logged and skipped. A key
    updated while the watch replays can arrive twice: the newest value wins."""
    watcher = await kv.watch(f"{prefix}.>", ignore_deletes=True)
    found: dict[str, R] = {}
    try:
        async for entry in watcher:
            if entry is None:  # the initial values are done
                break
            try:
                found[entry.key] = kind.from_bytes(entry.value)
            except ValidationError:
                log.warning("kv.invalid_record", key=entry.key)
    finally:
        await watcher.stop()
    return list(found.values())
