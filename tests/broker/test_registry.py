"""The worker registry against a real server: every edge lists it twice a second, so a listing must create
nothing on the server. nats-py's `keys()` made a consumer per listing; across node faults those piled up until
the cluster refused new ones and a restarted edge could not read the registry at all (chaos seed 2026)."""

from __future__ import annotations

import pytest

from broker import subjects
from broker.connection import connect
from broker.registry import WorkerRegistry
from contracts import WorkerInfo
from tests.engine_worker.scripted import scripted_worker_info

pytestmark = pytest.mark.asyncio


def worker(worker_id: str) -> WorkerInfo:
    return scripted_worker_info("tiny").model_copy(update={"worker_id": worker_id})


async def test_listing_the_registry_creates_no_consumer_and_sees_puts_and_withdrawals(batch_nats) -> None:
    async with connect(batch_nats.url, "test") as nc:
        js = nc.jetstream()
        registry = await WorkerRegistry.open(js, ttl_s=10.0)
        stream = f"KV_{subjects.REGISTRY_BUCKET}"
        for worker_id in ("w1", "w2", "w3"):
            await registry.announce(worker("reg-" + worker_id))
        await registry.withdraw("reg-w2")

        for _ in range(20):
            listed = {info.worker_id for info in await registry.live_workers()}
            assert {"reg-w1", "reg-w3"} <= listed
            assert "reg-w2" not in listed

        assert (await js.stream_info(stream)).state.consumer_count == 0
