"""Redeliveries at the worker bridge, against a real nats-server and a scripted engine (issue #22's chaos findings):
a lost ack must not have a request generated twice, and a fire-and-forget request (durable `inf.results.*` reply)
that ran into NATS failures must still end with a stored result. Acks are "lost" by dropping them on the worker's
connection, as a node fault drops them in transit; the request queue's ack wait is 3 s here instead of 30 s."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from broker import subjects, topology
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.registry import WorkerRegistry
from broker.results import read_result
from broker.topology import QueueLimits, ensure_journal_stream, ensure_request_queue, ensure_results_stream
from broker.work_queue import RequestIntake, publish_request
from contracts import (
    Accepted,
    End,
    Failed,
    GenerateRequest,
    SamplingParams,
    Tokens,
    parse_event,
)
from engine_worker.bridge import BridgeConfig, WorkerBridge
from tests.engine_worker.scripted import ScriptedEngine, scripted_worker_info
from tests.engine_worker.test_bridge import _failing_publishes

pytestmark = pytest.mark.asyncio
ACK_WAIT_S = 3.0
WAIT_S = 30.0
_models = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("store")) as nats_server:
        yield nats_server


@dataclass
class Rig:
    """A model queue of its own (3 s ack wait), a worker connection, a client connection; `start` runs a bridge
    over a scripted engine on the worker connection."""

    model: str
    nc: NatsClient
    client: NatsClient
    bridge: WorkerBridge | None = None
    task: asyncio.Task | None = None
    stop: asyncio.Event | None = None

    async def start(self, engine: ScriptedEngine | None = None) -> WorkerBridge:
        js = self.nc.jetstream()
        engine = engine or ScriptedEngine()
        self.bridge = WorkerBridge(
            self.nc,
            engine,
            RequestIntake(js, self.model),
            await WorkerRegistry.open(js, 10.0),
            scripted_worker_info(self.model),
            BridgeConfig(capacity=4, heartbeat_interval_s=1.0, announce_interval_s=1.0),
            validate=engine.validate,
        )
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.bridge.run(self.stop))
        return self.bridge

    async def send(
        self, request_id: str, reply_subject: str, max_tokens: int = 3, attempt: int = 1, listen: bool = True
    ) -> asyncio.Queue:
        """Publish a request; for a live reply subject (and `listen`), the queue its events arrive on."""
        events: asyncio.Queue = asyncio.Queue()
        if listen and not subjects.is_durable_reply(reply_subject):

            async def on_event(msg) -> None:
                await events.put(parse_event(msg.data))

            await self.client.subscribe(reply_subject, cb=on_event)
            await self.client.flush()
        request = GenerateRequest(
            request_id=request_id,
            model=self.model,
            prompt_token_ids=[1, 2],
            reply_subject=reply_subject,
            sampling=SamplingParams(max_tokens=max_tokens),
            attempt=attempt,
        )
        await publish_request(self.client.jetstream(), request)
        return events

    async def queue_is_empty(self) -> bool:
        info = await self.client.jetstream().consumer_info(
            subjects.request_stream(self.model), subjects.REQUEST_CONSUMER
        )
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def stored_count(self, reply_subject: str) -> int:
        """How many events were stored on a results subject, every attempt's."""
        info = await self.client.jetstream().stream_info(subjects.RESULTS_STREAM, subjects_filter=reply_subject)
        return (info.state.subjects or {}).get(reply_subject, 0)


@pytest.fixture
async def rig(server: EmbeddedNatsServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(topology, "REQUEST_ACK_WAIT_S", ACK_WAIT_S)
    async with connect(server.url, "worker") as nc, connect(server.url, "client") as client:
        js = nc.jetstream()
        model = f"redelivery{next(_models)}"
        await ensure_request_queue(js, model, QueueLimits(100, 120, 60))
        await ensure_results_stream(js, 600, 64 * 1024 * 1024)
        await ensure_journal_stream(js, 600, 8 * 1024 * 1024)
        rig = Rig(model, nc, client)
        yield rig
        if rig.task is not None:
            rig.stop.set()
            await asyncio.wait_for(rig.task, WAIT_S)


def _lose_acks(monkeypatch: pytest.MonkeyPatch, nc: NatsClient, lost: Callable[[int, Msg.Metadata], bool]) -> list:
    """Acks sent on `nc` vanish in transit where `lost(number of acks sent so far, the acked delivery)`: what a
    NATS node fault does to a plain ack, and to the request of a confirmed one. Returns the lost acks' subjects."""
    real, sent, dropped = nc.publish, itertools.count(), []

    async def publish(subject: str, payload: bytes = b"", reply: str = "", headers=None) -> None:
        if subject.startswith("$JS.ACK.") and payload in (b"", Msg.Ack.Ack):
            if lost(next(sent), Msg.Metadata._from_reply(subject)):
                dropped.append(subject)
                return
        await real(subject, payload, reply=reply, headers=headers)

    monkeypatch.setattr(nc, "publish", publish)
    return dropped


async def _until_last(events: asyncio.Queue) -> list:
    seen = []
    while not seen or not isinstance(seen[-1], End):
        seen.append(await asyncio.wait_for(events.get(), WAIT_S))
    return seen


async def _drained(events: asyncio.Queue) -> list:
    return [events.get_nowait() for _ in range(events.qsize())]


async def _eventually(condition: Callable, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("journaled", [False, True], ids=["live", "journaled"])
async def test_an_ack_lost_once_is_sent_again_and_the_request_runs_once(rig, monkeypatch, journaled) -> None:
    # The chaos run's 8 requests accepted twice: a plain ack lost in a node fault, redelivered 30 s later. Not
    # journaled (batch lines' inf.live subjects): no later check could catch the redelivery, only the ack itself.
    lost = _lose_acks(monkeypatch, rig.nc, lambda number, _: number == 0)
    await rig.start()
    reply = subjects.token_subject("edge", "once", journaled=journaled)
    events = await rig.send("once", reply)
    seen = await _until_last(events)
    assert lost, "the first ack was not lost: the test proves nothing"
    await asyncio.sleep(ACK_WAIT_S + 2.0)  # a redelivery would have come by now
    seen += await _drained(events)
    assert [e.attempt for e in seen if isinstance(e, Accepted)] == [1]
    assert await rig.queue_is_empty()


async def test_a_redelivery_after_the_ack_never_got_through_is_dropped_when_the_journal_shows_it_ran(
    rig, monkeypatch
) -> None:
    # Every ack of the first delivery lost (a consumer leader unreachable for the whole ack wait): the request is
    # redelivered; its events in the journal show it ran, so the redelivery is acked, not generated again.
    _lose_acks(monkeypatch, rig.nc, lambda _, delivery: delivery.num_delivered == 1)
    await rig.start()
    events = await rig.send("journaled", subjects.token_subject("edge", "journaled"))
    seen = await _until_last(events)
    await _eventually(rig.queue_is_empty, timeout_s=3 * ACK_WAIT_S + 10)  # redelivered once and acked
    await asyncio.sleep(1.0)
    seen += await _drained(events)
    assert [e.attempt for e in seen if isinstance(e, Accepted)] == [1]


async def test_a_durable_result_stored_but_not_acked_is_not_generated_again(rig, monkeypatch) -> None:
    _lose_acks(monkeypatch, rig.nc, lambda _, delivery: delivery.num_delivered == 1)
    await rig.start()
    reply = subjects.results_subject("test", "stored-once")
    await rig.send("stored-once", reply)
    js = rig.client.jetstream()
    assert (await read_result(js, reply, wait_s=WAIT_S)).finished
    await _eventually(rig.queue_is_empty, timeout_s=3 * ACK_WAIT_S + 10)
    result = await read_result(js, reply)
    assert result.attempt == 1 and isinstance(result.events[-1], End)
    assert await rig.stored_count(reply) == len(result.events)  # accepted, 3 tokens, end: of one run only


@pytest.mark.parametrize("journaled", [False, True], ids=["durable", "journaled"])
async def test_a_request_whose_worker_died_before_acking_still_runs_on_its_redelivery(rig, journaled) -> None:
    # A worker that took the request and died before acking it: the redelivery is the only recovery for a direct
    # publisher, and the quicker one for an edge's request. The redelivery check must not drop it.
    reply = subjects.token_subject("edge", "orphan") if journaled else subjects.results_subject("test", "orphan")
    events = await rig.send("orphan", reply)
    dead = await rig.client.jetstream().pull_subscribe_bind(
        subjects.REQUEST_CONSUMER, stream=subjects.request_stream(rig.model)
    )
    taken = await dead.fetch(1, timeout=WAIT_S)  # taken, never acked: its worker is gone
    assert len(taken) == 1
    await dead.unsubscribe()
    await rig.start()
    if journaled:
        seen = await _until_last(events)
        assert [e.attempt for e in seen if isinstance(e, Accepted)] == [1]
    else:
        result = await read_result(rig.client.jetstream(), reply, wait_s=WAIT_S)
        assert result.finished and result.attempt == 2 and isinstance(result.events[-1], End)


async def test_a_direct_publish_whose_acceptance_was_not_stored_is_answered_later(rig, monkeypatch) -> None:
    # The old bridge terminated a request it could not admit and published a refusal; with NATS failing (why
    # admitting failed) the refusal was not stored either, and the held request was gone for good, unanswered.
    failed: list[int] = []

    def fails(event) -> bool:
        if isinstance(event, Accepted) and not failed:
            failed.append(event.attempt)
            return True
        return isinstance(event, Failed)

    _failing_publishes(monkeypatch, fails)
    await rig.start()
    reply = subjects.results_subject("test", "admitted-later")
    await rig.send("admitted-later", reply)
    result = await read_result(rig.client.jetstream(), reply, wait_s=10)
    assert failed == [1]
    assert result.finished and isinstance(result.events[-1], End) and result.attempt > 1
    tokens = [t for e in result.events if isinstance(e, Tokens) for c in e.choices for t in c.token_ids]
    assert tokens == [100, 101, 102]
    await _eventually(rig.queue_is_empty)


async def test_a_direct_publish_that_fails_more_often_than_the_queue_redelivers_is_still_answered(
    rig, monkeypatch
) -> None:
    # Each failure handed the request back with a nak, which spends one of its 3 deliveries; after the third
    # JetStream never delivered it again, and its publisher waited for nothing (the chaos run's direct publishes).
    failed: list[int] = []

    def fails(event) -> bool:
        if isinstance(event, Tokens) and event.attempt not in failed and len(failed) < topology.REQUEST_MAX_DELIVER:
            failed.append(event.attempt)
        return isinstance(event, Tokens) and event.attempt in failed

    _failing_publishes(monkeypatch, fails)
    await rig.start()
    reply = subjects.results_subject("test", "persistent")
    await rig.send("persistent", reply)
    result = await read_result(rig.client.jetstream(), reply, wait_s=15)
    assert len(failed) == topology.REQUEST_MAX_DELIVER and failed == sorted(set(failed))
    assert result.finished and isinstance(result.events[-1], End) and result.attempt > max(failed)
    tokens = [t for e in result.events if isinstance(e, Tokens) for c in e.choices for t in c.token_ids]
    assert tokens == [100, 101, 102]
    await _eventually(rig.queue_is_empty)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "journaled"])
async def test_an_older_attempt_arriving_while_a_newer_one_runs_is_dropped_not_run(rig, durable) -> None:
    # Chaos seed 2026, 30 minutes: a worker gave a direct publish back (a copy queued as attempt 4) but NATS
    # reported the give-back failed, so the old message was nak'd too; its redelivery (attempt 2) reached the
    # worker running attempt 4, which aborted the newer attempt to run the older one. Readers keep the newest
    # attempt: the publisher got attempt 4's "abort" after 18 tokens. Live: an edge's resubmission (attempt 2)
    # running when the first attempt's message arrives late.
    newer, older = (1 + topology.REQUEST_MAX_DELIVER, 2) if durable else (2, 1)
    reply = subjects.results_subject("test", "older") if durable else subjects.token_subject("edge", "older")
    engine = ScriptedEngine()
    engine.proceed.clear()  # the newer attempt stays in flight until the older delivery was handled
    await rig.start(engine)
    events = await rig.send("older", reply, attempt=newer)
    await _eventually(lambda: _running(rig.bridge, newer))
    await rig.send("older", reply, attempt=older, listen=False)
    await _eventually(_taken_from_queue(rig))
    await asyncio.sleep(1.0)  # admitted (or dropped) right after it was pulled
    engine.proceed.set()
    if durable:
        result = await read_result(rig.client.jetstream(), reply, wait_s=WAIT_S)
        assert result.attempt == newer and isinstance(result.events[-1], End)
        seen = result.events
    else:
        seen = await _until_last(events)
        await asyncio.sleep(1.0)
        seen += await _drained(events)
    tokens = [t for e in seen if isinstance(e, Tokens) and e.attempt == newer for c in e.choices for t in c.token_ids]
    finishes = [c.finish_reason for e in seen if isinstance(e, Tokens) and e.attempt == newer for c in e.choices]
    assert tokens == [100, 101, 102] and finishes[-1] == "length"  # before: [], "abort"
    assert [e.attempt for e in seen if isinstance(e, Accepted)] == [newer]
    await _eventually(rig.queue_is_empty)  # the older message acked, the newer one done
    if durable:
        assert await rig.stored_count(reply) == len(result.events)  # nothing of the older attempt stored


async def _running(bridge: WorkerBridge, attempt: int) -> bool:
    return any(flight.request.attempt == attempt for flight in bridge._in_flight.values())


def _taken_from_queue(rig: Rig) -> Callable:
    async def taken() -> bool:
        info = await rig.client.jetstream().consumer_info(subjects.request_stream(rig.model), subjects.REQUEST_CONSUMER)
        return info.num_pending == 0

    return taken


async def test_a_newer_attempt_in_another_message_acks_the_message_of_the_attempt_it_supersedes(rig) -> None:
    # A direct publish runs as attempt 1 when its given-back copy (attempt 4, a message of its own) arrives. The
    # copy runs; the original message is done. Before, it was never acked: redelivered after the ack wait.
    reply = subjects.results_subject("test", "copied")
    engine = ScriptedEngine()
    engine.proceed.clear()
    await rig.start(engine)
    await rig.send("copied", reply)
    await _eventually(lambda: _running(rig.bridge, 1))
    await rig.send("copied", reply, attempt=1 + topology.REQUEST_MAX_DELIVER)
    await _eventually(lambda: _running(rig.bridge, 1 + topology.REQUEST_MAX_DELIVER))
    engine.proceed.set()
    result = await read_result(rig.client.jetstream(), reply, wait_s=WAIT_S)
    assert result.attempt == 1 + topology.REQUEST_MAX_DELIVER and isinstance(result.events[-1], End)
    tokens = [t for e in result.events if isinstance(e, Tokens) for c in e.choices for t in c.token_ids]
    assert tokens == [100, 101, 102]
    await asyncio.sleep(ACK_WAIT_S + 2.0)  # an unacked original would have been redelivered by now
    info = await rig.client.jetstream().consumer_info(subjects.request_stream(rig.model), subjects.REQUEST_CONSUMER)
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert info.delivered.consumer_seq == 2  # the original and the copy, once each (before: 3)
