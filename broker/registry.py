"""The worker registry: each worker re-puts its `WorkerInfo` on a heartbeat; entries expire with the bucket TTL,
so a crashed worker disappears by itself."""

from __future__ import annotations

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.kv import KeyValue
from pydantic import ValidationError

from broker import subjects
from broker.errors import BrokerUnavailable
from broker.kv import stored_keys
from broker.topology import ensure_registry
from contracts import WorkerInfo

log = structlog.get_logger(__name__)


class WorkerRegistry:
    def __init__(self, kv: KeyValue):
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, ttl_s: float, replicas: int = 1) -> WorkerRegistry:
        return cls(await ensure_registry(js, ttl_s, replicas))

    async def announce(self, info: WorkerInfo) -> None:
        await self._kv.put(subjects.registry_key(info.worker_id), info.to_bytes())

    async def withdraw(self, worker_id: str) -> None:
        try:
            await self._kv.delete(subjects.registry_key(worker_id))
        except jse.KeyNotFoundError:
            pass

    async def live_workers(self) -> list[WorkerInfo]:
        try:
            return await self._read_all()
        except (TimeoutError, jse.APIError, nats.errors.Error) as exc:  # a node failing over, NATS reconnecting
            raise BrokerUnavailable(f"the worker registry is unavailable: {exc or type(exc).__name__}") from exc

    async def _read_all(self) -> list[WorkerInfo]:
        workers = []
        for key in await stored_keys(self._kv):
            try:
                entry = await self._kv.get(key)
            except (jse.KeyNotFoundError, jse.KeyDeletedError):
                continue  # expired between the listing and get()
            if entry.value:
                try:
                    workers.append(WorkerInfo.from_bytes(entry.value))
                except ValidationError:
                    log.warning("registry.invalid_entry", key=key)
        return workers
