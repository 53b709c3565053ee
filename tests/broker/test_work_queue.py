"""The queue contract against a real nats-server: dedup, backpressure, intake batching, fates of messages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.errors import QueueFull, QueueMissing
from broker.events import EventRouter, publish_event
from broker.registry import WorkerRegistry
from broker.topology import QueueLimits, ensure_request_queue
from broker.work_queue import DrainGauge, Lane, RequestIntake, publish_request, queue_depth
from contracts import Accepted, DeviceInfo, GenerateRequest, WorkerInfo

pytestmark = pytest.mark.asyncio


def make_request(request_id: str, model: str, attempt: int = 1) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        model=model,
        prompt_token_ids=[1, 2],
        reply_subject=f"inf.tok.e.{request_id}",
        attempt=attempt,
    )


async def test_publish_dedups_by_request_id_and_attempt(nc) -> None:
    js = nc.jetstream()
    await ensure_request_queue(js, "dedup/model", QueueLimits(100, 60, 60))
    assert await publish_request(js, make_request("a", "dedup/model")) is True
    assert await publish_request(js, make_request("a", "dedup/model")) is False  # a retried POST
    assert await publish_request(js, make_request("a", "dedup/model", attempt=2)) is True  # a resubmission
    assert await queue_depth(js, "dedup/model") == 2


async def test_full_queue_raises_queue_full(nc) -> None:
    js = nc.jetstream()
    await ensure_request_queue(js, "small", QueueLimits(2, 60, 60))
    await publish_request(js, make_request("s1", "small"))
    await publish_request(js, make_request("s2", "small"))
    with pytest.raises(QueueFull):
        await publish_request(js, make_request("s3", "small"))


async def test_publish_without_queue_raises_queue_missing(nc) -> None:
    # No stream answers: retried as a passing failure (a leader election looks the same) until the retry budget
    # is spent, then QueueMissing. A budget of 1 s instead of the default 15 s: the same retries, then the same end.
    started = time.monotonic()
    with pytest.raises(QueueMissing):
        await publish_request(nc.jetstream(), make_request("x", "never-served"), retry_for_s=1.0)
    assert time.monotonic() - started >= 0.5  # it did retry (0.1 + 0.2 + 0.4 s of back-off) before giving up


async def test_intake_pulls_at_most_the_free_slots(nc) -> None:
    js = nc.jetstream()
    await ensure_request_queue(js, "intake", QueueLimits(100, 60, 60))
    for i in range(5):
        await publish_request(js, make_request(f"i{i}", "intake"))
    intake = RequestIntake(js, "intake")
    await intake.start()
    first = await intake.fetch(3, timeout=1)
    assert [d.request.request_id for d in first] == ["i0", "i1", "i2"]
    for delivery in first:
        await delivery.msg.ack()
    rest = await intake.fetch(10, timeout=1)
    assert [d.request.request_id for d in rest] == ["i3", "i4"]
    for delivery in rest:
        await delivery.msg.ack()
    assert await intake.fetch(1, timeout=0.2) == []
    await intake.stop()


async def test_malformed_messages_are_terminated_not_redelivered(nc) -> None:
    js = nc.jetstream()
    await ensure_request_queue(js, "garbage", QueueLimits(100, 60, 60))
    await js.publish("inf.req.garbage", b'{"not": "a request"}')
    await publish_request(js, make_request("ok", "garbage"))
    intake = RequestIntake(js, "garbage")
    await intake.start()
    deliveries = await intake.fetch(5, timeout=1)
    assert [d.request.request_id for d in deliveries] == ["ok"]
    await deliveries[0].msg.ack()
    await asyncio.sleep(0.2)
    assert await queue_depth(js, "garbage") == 0
    await intake.stop()


async def test_event_router_delivers_by_request_id(nc) -> None:
    router = EventRouter(nc, "edge1")
    await router.start()
    queue = router.open("r1")
    await publish_event(nc, router.reply_subject("r1"), Accepted(request_id="r1", seq=0, worker_id="w"))
    await publish_event(nc, router.reply_subject("r2"), Accepted(request_id="r2", seq=0, worker_id="w"))
    event = await asyncio.wait_for(queue.get(), 2)
    assert event.kind == "accepted" and event.request_id == "r1"
    await asyncio.sleep(0.1)
    assert queue.empty()
    router.close("r1")
    await router.stop()


async def test_registry_entries_expire(nc, tmp_path: Path) -> None:
    registry = await WorkerRegistry.open(nc.jetstream(), ttl_s=1)
    info = WorkerInfo(
        worker_id="w1",
        model="m",
        model_source="/x",
        max_model_len=10,
        capacity=1,
        device=DeviceInfo(kind="cpu", name="cpu"),
        dtype="float32",
        host="h",
        pid=1,
        started_at=0,
        updated_at=0,
        tokenizer_object="t",
    )
    await registry.announce(info)
    assert [w.worker_id for w in await registry.live_workers()] == ["w1"]
    await asyncio.sleep(2.5)
    assert await registry.live_workers() == []


async def test_batch_lane_is_pulled_only_when_no_interactive_request_waits(nc) -> None:
    js = nc.jetstream()
    await ensure_request_queue(js, "lanes", QueueLimits(100, 60, 60))
    for i in range(3):
        await publish_request(js, make_request(f"b{i}", "lanes"), lane=Lane.BATCH)
    await publish_request(js, make_request("i0", "lanes"))
    intake = RequestIntake(js, "lanes")
    await intake.start()

    async def pull(slots: int) -> list[str]:
        deliveries = await intake.fetch(slots, timeout=0.5)
        for delivery in deliveries:
            await delivery.msg.ack()
        return [delivery.request.request_id for delivery in deliveries]

    first = await pull(2)
    assert first[0] == "i0"  # the interactive request first, though it was queued last
    batch_lines: list[str] = first[1:]  # the slot it left may go to batch work at once
    while len(batch_lines) < 3:
        batch_lines += await pull(4)
    assert batch_lines == ["b0", "b1", "b2"]
    await intake.stop()


async def test_a_steady_trickle_of_interactive_requests_does_not_starve_the_batch_lane(nc) -> None:
    """Interactive requests arriving every 0.2 s end each interactive long-poll with something: a worker that
    offered its free slots to the batch lane only after an interactive pull came back empty never took batch
    work while interactive traffic flowed (chaos seed 22: a batch stuck at 8 of 16 lines, the rest pending)."""
    js = nc.jetstream()
    await ensure_request_queue(js, "trickle", QueueLimits(1000, 60, 60))
    intake = RequestIntake(js, "trickle")
    await intake.start()
    stop = asyncio.Event()

    async def trickle() -> None:
        number = 0
        while not stop.is_set():
            await publish_request(js, make_request(f"i{number}", "trickle"))
            number += 1
            await asyncio.sleep(0.2)

    feeder = asyncio.create_task(trickle())
    taken: list[str] = []
    try:
        await asyncio.sleep(0.5)  # interactive traffic flows
        await publish_request(js, make_request("b0", "trickle"), lane=Lane.BATCH)
        deadline = time.monotonic() + 10
        while "b0" not in taken and time.monotonic() < deadline:
            for delivery in await intake.fetch(8, timeout=1.0):
                await delivery.msg.ack()
                taken.append(delivery.request.request_id)
    finally:
        stop.set()
        await feeder
        await intake.stop()
    assert "b0" in taken, f"the batch request waited 10 s behind {len(taken)} interactive ones with slots free"
    assert sum(1 for request_id in taken if request_id.startswith("i")) >= 3  # interactive work kept flowing


async def test_drain_gauge_tells_how_long_the_backlog_takes_at_the_recent_rate(nc) -> None:
    js = nc.jetstream()
    model = "drain-model"
    await ensure_request_queue(js, model, QueueLimits(100, 60, 60))
    for i in range(10):
        await publish_request(js, make_request(f"d{i}", model))
    now = [100.0]
    gauge = DrainGauge(js, clock=lambda: now[0])
    assert await gauge.retry_after(model) == 2.0  # no rate known yet: a short, honest default
    intake = RequestIntake(js, model)
    await intake.start()
    assert len(await intake.fetch(4, timeout=2)) == 4  # a worker takes 4 ...
    now[0] += 2.0  # ... in 2 s: 2 per second, 6 waiting
    assert await gauge.retry_after(model) == pytest.approx(3.0)
    now[0] += 8.0  # nothing more taken: 4 in 10 s
    assert await gauge.retry_after(model) == pytest.approx(15.0)
    now[0] += 30.0  # the window is stale: measure again
    assert await gauge.retry_after(model) == 2.0
    now[0] += 5.0  # and nobody takes anything: the longest wait we tell
    assert await gauge.retry_after(model) == 60.0
    await intake.stop()
