"""Requests whose workers all died, against a real nats-server: a "worker" that fetches a request and never acks it
(it died), `max_deliver` times, with a 1 s ack wait. JetStream then never delivers the request again; the
max-deliveries advisory it publishes is kept by our stream even with no watcher running, and a watcher answers the
request once with a `worker_crashed` error, where its publisher reads it, and removes it from the queue."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js import errors as jse

from broker import subjects, topology
from broker.connection import connect
from broker.events import publish_event
from broker.max_deliveries import MaxDeliveries, MaxDeliveriesWatcher, Settled, settle
from broker.results import read_result
from broker.topology import (
    REQUEST_MAX_DELIVER,
    QueueLimits,
    ensure_max_deliveries_queue,
    ensure_request_queue,
    ensure_results_stream,
)
from broker.work_queue import Delivery, Queued, RequestIntake, enqueue_request, still_queued
from contracts import Accepted, ErrorCode, GenerateRequest, parse_event

pytestmark = pytest.mark.asyncio

ACK_WAIT_S = 1.0  # instead of 30 s: a dead worker's request is handed out again after a second
DEADLINE_S = 30.0


@pytest.fixture
async def model(nc, monkeypatch: pytest.MonkeyPatch) -> str:
    """A model of its own per test, whose queue redelivers after ACK_WAIT_S."""
    monkeypatch.setattr(topology, "REQUEST_ACK_WAIT_S", ACK_WAIT_S)
    name = f"crashy-{uuid.uuid4().hex[:8]}"
    js = nc.jetstream()
    await ensure_request_queue(js, name, QueueLimits(100, 600, 60))
    await ensure_results_stream(js, 600, 64 * 1024 * 1024)
    await ensure_max_deliveries_queue(js)
    return name


def generate(model: str, reply_subject: str, request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, model=model, prompt_token_ids=[1, 2], reply_subject=reply_subject)


class DyingWorkers:
    """Workers that each take the request, announce it (as a real worker does before it generates) and die before
    they ack it. They keep pulling afterwards, as live workers do: the request must never come back."""

    def __init__(self, nc, model: str):
        self._nc = nc
        self._intake = RequestIntake(nc.jetstream(), model)
        self.deliveries: list[Delivery] = []

    async def __aenter__(self) -> DyingWorkers:
        await self._intake.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._intake.stop()

    async def die_running_it(self) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while len(self.deliveries) < REQUEST_MAX_DELIVER:
                for delivery in await self._intake.fetch(1, timeout=ACK_WAIT_S):
                    self.deliveries.append(delivery)
                    request = delivery.request
                    attempt = delivery.held_attempt if subjects.is_durable_reply(request.reply_subject) else 1
                    accepted = Accepted(request_id=request.request_id, attempt=attempt, seq=0, worker_id="w")
                    await publish_event(self._nc, request.reply_subject, accepted)

    async def pull_nothing(self) -> None:
        assert await self._intake.fetch(1, timeout=0.2) == [], "a request past max_deliver came back"

    async def keep_pulling(self) -> None:
        while True:
            await self.pull_nothing()


async def kept_advisory(js, queued: Queued, workers: DyingWorkers) -> MaxDeliveries:
    """The advisory of `queued`'s message, once JetStream has published it and our stream has kept it."""
    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{queued.stream}.{subjects.REQUEST_CONSUMER}"
    async with asyncio.timeout(DEADLINE_S):
        while True:
            try:
                return MaxDeliveries.from_bytes((await js.get_last_msg(subjects.MAX_DELIVERIES_STREAM, subject)).data)
            except jse.NotFoundError:
                await workers.pull_nothing()


async def stored_errors(js, reply_subject: str) -> int:
    """Error events stored on `reply_subject`, of every attempt."""
    sub = await js.subscribe(reply_subject, stream=subjects.RESULTS_STREAM, ordered_consumer=True)
    errors = 0
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return errors
            errors += parse_event(msg.data).kind == "error"
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def watching(*connections) -> AsyncIterator[list[MaxDeliveriesWatcher]]:
    watchers = [MaxDeliveriesWatcher(connection) for connection in connections]
    for watcher in watchers:
        await watcher.start()
    try:
        yield watchers
    finally:
        for watcher in watchers:
            await watcher.stop()


async def test_a_direct_publish_whose_workers_all_died_gets_one_stored_error(nc, model) -> None:
    js = nc.jetstream()
    request_id = f"ff-{uuid.uuid4().hex[:8]}"
    reply = subjects.results_subject("crash", request_id)
    queued = await enqueue_request(js, generate(model, reply, request_id))
    async with DyingWorkers(nc, model) as workers:
        await workers.die_running_it()
        advisory = await kept_advisory(js, queued, workers)  # kept while no watcher runs
        assert (advisory.stream, advisory.stream_seq, advisory.deliveries) == (queued.stream, queued.seq, 3)
        # What the publisher saw before: an unfinished answer, and the request stuck in the queue for good.
        assert not (await read_result(js, reply)).finished
        assert await still_queued(js, queued) is True

        async with watching(nc) as [watcher]:
            result = await read_result(js, reply, wait_s=DEADLINE_S)
            assert result.finished
            assert result.attempt == 3  # the last delivery's: readers keep the newest attempt
            assert [event.kind for event in result.events] == ["accepted", "error"]
            assert result.events[-1].error.code is ErrorCode.WORKER_CRASHED
            assert "died 3 times" in result.events[-1].error.message
            assert await still_queued(js, queued) is False  # no longer holds a place in the queue
            await asyncio.sleep(2 * ACK_WAIT_S)  # the advisory is not settled a second time
            assert watcher.answered == 1
        assert await stored_errors(js, reply) == 1


async def test_a_live_request_whose_workers_all_died_gets_the_error_on_its_reply_subject(nc, model) -> None:
    """What an edge (an HTTP client's request, a batch line) waits on: the error arrives there, for the attempt it
    published, and it ends the request (api/generation.py raises it; tests/api/test_worker_crashed.py)."""
    js = nc.jetstream()
    request_id = f"live-{uuid.uuid4().hex[:8]}"
    reply = subjects.token_subject("edge1", request_id, journaled=False)
    events = await nc.subscribe(reply)
    await nc.flush()
    queued = await enqueue_request(js, generate(model, reply, request_id))
    async with DyingWorkers(nc, model) as workers, watching(nc):
        await workers.die_running_it()
        pulling = asyncio.create_task(workers.keep_pulling())
        try:
            async with asyncio.timeout(DEADLINE_S):
                while (event := parse_event((await events.next_msg(timeout=DEADLINE_S)).data)).kind != "error":
                    assert event.kind == "accepted"
        finally:
            pulling.cancel()
            await asyncio.gather(pulling, return_exceptions=True)
    assert event.attempt == 1 and event.request_id == request_id
    assert event.error.code is ErrorCode.WORKER_CRASHED
    assert await still_queued(js, queued) is False


async def test_two_watchers_store_the_error_once(server, nc, model) -> None:
    js = nc.jetstream()
    async with connect(server.url, "second-watcher") as other:
        # Both settle the same advisory at once: both read the request before either removes it.
        request_id = f"race-{uuid.uuid4().hex[:8]}"
        reply = subjects.results_subject("race", request_id)
        queued = await enqueue_request(js, generate(model, reply, request_id))
        async with DyingWorkers(nc, model) as workers:
            await workers.die_running_it()
            advisory = await kept_advisory(js, queued, workers)
        outcomes = await asyncio.gather(settle(nc, advisory), settle(other, advisory))
        # The later one may find the error stored already (FINISHED) or the message deleted (GONE).
        assert Settled.ANSWERED in outcomes and set(outcomes) <= {Settled.ANSWERED, Settled.FINISHED, Settled.GONE}
        # And again later: nothing left to settle (the copy its last delivery left names a finished result).
        assert await settle(nc, advisory) is Settled.FINISHED
        assert await stored_errors(js, reply) == 1

        # Two watchers on the shared consumer: the advisory above (already settled) and a new one, each once.
        request_id = f"pair-{uuid.uuid4().hex[:8]}"
        reply = subjects.results_subject("pair", request_id)
        queued = await enqueue_request(js, generate(model, reply, request_id))
        async with watching(nc, other) as watchers, DyingWorkers(nc, model) as workers:
            await workers.die_running_it()
            pulling = asyncio.create_task(workers.keep_pulling())
            try:
                assert (await read_result(js, reply, wait_s=DEADLINE_S)).finished
            finally:
                pulling.cancel()
                await asyncio.gather(pulling, return_exceptions=True)
            await asyncio.sleep(2 * ACK_WAIT_S)
            assert sum(watcher.answered for watcher in watchers) == 1
        assert await stored_errors(js, reply) == 1
        assert await still_queued(js, queued) is False


async def test_an_advisory_of_a_message_no_longer_queued_stores_nothing(nc, model) -> None:
    """A worker that was only slow (its late ack removed the request) or a request that aged out of its queue
    before a last delivery left a copy of it: nothing to answer, and nothing is published."""
    js = nc.jetstream()
    request_id = f"gone-{uuid.uuid4().hex[:8]}"
    reply = subjects.results_subject("gone", request_id)
    queued = await enqueue_request(js, generate(model, reply, request_id))
    await js.delete_msg(queued.stream, queued.seq)
    advisory = MaxDeliveries(queued.stream, subjects.REQUEST_CONSUMER, queued.seq, REQUEST_MAX_DELIVER)
    assert await settle(nc, advisory) is Settled.GONE
    assert await settle(nc, MaxDeliveries("KV_other", "c", 1, 3)) is Settled.NOT_A_REQUEST
    assert await stored_errors(js, reply) == 0


async def test_a_direct_publish_whose_workers_all_died_is_answered_after_it_aged_out_of_its_queue(
    nc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No api ran from the last delivery until the queue dropped the request at its max age: the watcher that
    starts afterwards answers it from the copy the last delivery left (broker/last_delivery.py). Before: the
    advisory named a message that was gone, and the publisher waited for ever."""
    monkeypatch.setattr(topology, "REQUEST_ACK_WAIT_S", ACK_WAIT_S)
    js = nc.jetstream()
    model = f"aging-{uuid.uuid4().hex[:8]}"
    await ensure_request_queue(js, model, QueueLimits(100, 8, 2))  # max age 8 s: past the third delivery
    await ensure_results_stream(js, 600, 64 * 1024 * 1024)
    await ensure_max_deliveries_queue(js)
    request_id = f"aged-{uuid.uuid4().hex[:8]}"
    reply = subjects.results_subject("aged", request_id)
    queued = await enqueue_request(js, generate(model, reply, request_id))
    async with DyingWorkers(nc, model) as workers:
        await workers.die_running_it()
        await kept_advisory(js, queued, workers)
    async with asyncio.timeout(DEADLINE_S):
        while await still_queued(js, queued) is not False:
            await asyncio.sleep(0.5)

    async with watching(nc) as [watcher]:
        result = await read_result(js, reply, wait_s=DEADLINE_S)
    assert result.finished and result.attempt == 3
    assert result.events[-1].error.code is ErrorCode.WORKER_CRASHED
    assert watcher.answered == 1 and await stored_errors(js, reply) == 1
