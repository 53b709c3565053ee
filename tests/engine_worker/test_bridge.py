"""The worker bridge against a real nats-server and a scripted engine: a request streams accepted → tokens →
end; the error code of a refusal comes from the error's type; a cancel aborts; scrapes report the stats the
engine thread handed over, and only `validate` ever ran off the engine thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.events import publish_cancel
from broker.registry import WorkerRegistry
from broker.topology import QueueLimits, ensure_request_queue
from broker.work_queue import RequestIntake, publish_request
from contracts import (
    Accepted,
    End,
    ErrorCode,
    Failed,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    Tokens,
    parse_event,
)
from engine_worker.bridge import BridgeConfig, WorkerBridge
from tests.engine_worker.scripted import ScriptedEngine, scripted_worker_info

pytestmark = pytest.mark.asyncio
MODEL = "scripted"
WAIT_S = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("store")) as nats_server:
        yield nats_server


@pytest.fixture
async def worker(server: EmbeddedNatsServer) -> AsyncIterator[tuple]:
    """A running bridge over a scripted engine, and a client connection."""
    engine = ScriptedEngine()
    async with connect(server.url, "worker") as nc, connect(server.url, "client") as client:
        js = nc.jetstream()
        await ensure_request_queue(js, MODEL, QueueLimits(100, 60, 60))
        info = scripted_worker_info(MODEL)
        bridge = WorkerBridge(
            nc,
            engine,
            RequestIntake(js, MODEL),
            await WorkerRegistry.open(js, 10.0),
            info,
            BridgeConfig(capacity=4, heartbeat_interval_s=1.0, announce_interval_s=1.0),
            validate=engine.validate,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        yield bridge, engine, client
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


async def _send(client, request_id: str, prompt_len: int = 2, max_tokens: int = 3) -> asyncio.Queue:
    """Publish a request with a live reply subject; returns the queue its events arrive on."""
    events: asyncio.Queue = asyncio.Queue()
    reply = f"inf.live.test.{request_id}"

    async def on_event(msg) -> None:
        await events.put(parse_event(msg.data))

    await client.subscribe(reply, cb=on_event)
    await client.flush()
    request = GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=[1] * prompt_len,
        reply_subject=reply,
        sampling=SamplingParams(max_tokens=max_tokens),
    )
    await publish_request(client.jetstream(), request)
    return events


async def _until_last(events: asyncio.Queue) -> list:
    seen = []
    while not seen or not isinstance(seen[-1], End | Failed):
        seen.append(await asyncio.wait_for(events.get(), WAIT_S))
    return seen


async def test_a_request_streams_and_the_scrape_shows_the_engine_stats(worker) -> None:
    bridge, engine, client = worker
    seen = await _until_last(await _send(client, "r1", max_tokens=3))
    assert isinstance(seen[0], Accepted) and isinstance(seen[-1], End)
    tokens = [t for e in seen if isinstance(e, Tokens) for c in e.choices for t in c.token_ids]
    assert tokens == [100, 101, 102] and seen[-1].usage.completion_tokens == 3
    assert [e.seq for e in seen] == list(range(len(seen)))  # gap-free per-request sequence numbers
    # The scripted engine counts steps as "preemptions": only its own stats, handed over, can say 3.
    deadline = time.monotonic() + WAIT_S
    while (snapshot := bridge.metrics_snapshot()).num_preemptions_total != engine.steps:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert snapshot.num_preemptions_total == 3 and snapshot.num_requests_running == 0
    assert threading.get_ident() not in engine.threads and len(engine.threads) == 1


async def test_a_context_overflow_is_refused_by_type_not_by_text(worker) -> None:
    _, engine, client = worker
    seen = await _until_last(await _send(client, "long", prompt_len=30, max_tokens=10))
    assert [type(e) for e in seen] == [Failed]
    assert seen[0].error.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert "context" not in seen[0].error.message  # the old bridge picked the code by that word
    assert engine.steps == 0


async def test_a_cancel_aborts_the_running_request(worker) -> None:
    _, engine, client = worker
    engine.proceed.clear()  # hold the engine so the cancel arrives mid-request
    events = await _send(client, "c1", max_tokens=20)
    assert isinstance(await asyncio.wait_for(events.get(), WAIT_S), Accepted)
    await publish_cancel(client, "c1")
    await client.flush()
    await asyncio.sleep(0.2)  # the cancel reaches the worker before the engine moves on
    engine.proceed.set()
    seen = await _until_last(events)
    finishes = [c.finish_reason for e in seen if isinstance(e, Tokens) for c in e.choices if c.finish_reason]
    assert finishes == [FinishReason.ABORT] and isinstance(seen[-1], End)


def _failing_publishes(monkeypatch: pytest.MonkeyPatch, fails) -> None:
    """NATS not taking the worker's events (a frozen node: JetStream publishes time out) where `fails(event)`."""
    from engine_worker import bridge as bridge_module

    real = bridge_module.publish_event

    async def publish(nc, reply_subject, event) -> None:
        if fails(event):
            raise TimeoutError("nats: timeout")
        await real(nc, reply_subject, event)

    monkeypatch.setattr(bridge_module, "publish_event", publish)


async def test_events_nats_did_not_take_do_not_stop_the_worker(worker, monkeypatch: pytest.MonkeyPatch) -> None:
    # The chaos run's seed 2026: one publish timing out during a node freeze ended the output pump for good.
    _, _, client = worker
    _failing_publishes(monkeypatch, lambda event: event.request_id == "lost" and isinstance(event, Tokens))
    lost = await _send(client, "lost", max_tokens=3)
    assert isinstance(await asyncio.wait_for(lost.get(), WAIT_S), Accepted)
    seen = await _until_last(await _send(client, "after", max_tokens=3))
    assert isinstance(seen[-1], End) and seen[-1].usage.completion_tokens == 3


async def test_an_admission_nats_failed_frees_its_slot_and_the_intake_goes_on(worker, monkeypatch) -> None:
    # Accepted not published, then the refusal not either: the feeder died, and the slot stayed taken.
    bridge, _, client = worker
    _failing_publishes(monkeypatch, lambda event: event.request_id.startswith("unadmitted"))
    for number in range(bridge._config.capacity + 1):  # more than the slots: a leaked slot would block "after"
        await _send(client, f"unadmitted{number}")
    await asyncio.sleep(1.0)
    seen = await _until_last(await _send(client, "after-admission", max_tokens=3))
    assert isinstance(seen[-1], End) and seen[-1].usage.completion_tokens == 3
    assert bridge._free_slots() == bridge._config.capacity


async def test_the_registry_entry_says_whether_the_compiled_decode_step_is_ready_yet(server) -> None:
    # A worker serves while its compiled decode step compiles (engine_worker/compiled_decode.py); its registry
    # entry says so on every beat, which is what /health counts and the bench waits for.
    engine = ScriptedEngine()
    state = ["compiling"]
    async with connect(server.url, "compiling-worker") as nc:
        js = nc.jetstream()
        await ensure_request_queue(js, "compiling", QueueLimits(100, 60, 60))
        registry = await WorkerRegistry.open(js, 10.0)
        info = scripted_worker_info("compiling").model_copy(update={"worker_id": "w-compiling"})
        bridge = WorkerBridge(
            nc,
            engine,
            RequestIntake(js, "compiling"),
            registry,
            info,
            BridgeConfig(capacity=4, heartbeat_interval_s=1.0, announce_interval_s=0.5),
            validate=engine.validate,
            compiled_decode_state=lambda: state[0],
        )
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))

        async def announced() -> str | None:
            deadline = time.monotonic() + WAIT_S
            while not (mine := [w for w in await registry.live_workers() if w.worker_id == "w-compiling"]):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            return mine[0].compiled_decode

        try:
            assert await announced() == "compiling"
            state[0] = "ready"
            deadline = time.monotonic() + WAIT_S
            while await announced() != "ready":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_S)
