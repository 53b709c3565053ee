"""A retried POST (same Idempotency-Key) of a keyed chat that had finished, whose journal reader delivers none of
the request's stored events (chaos run, seed 2026, 30 minutes, `keyed2.404.dup`: three retries attached, heard
nothing and answered 503 `no_worker` a 60 s queue timeout later). Real nats-server; the engine client of the edge
the retry reached; the "worker" is this test, pulling from the queue with the worker's own intake."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js import JetStreamContext

from api.generation import Timeouts
from api.nats_engine_client import NatsEngineClient
from broker import subjects
from broker.events import EventRouter, publish_event
from broker.topology import QueueLimits, ensure_journal_stream, ensure_request_queue
from broker.work_queue import RequestIntake
from contracts import Accepted, ChoiceDelta, End, FinishReason, GenerateRequest, SamplingParams, Tokens, Usage
from tests.broker.conftest import nc, server
from tests.broker.test_journal import deaf_consumers, stored_in_journal
from tests.integration.test_lost_acceptance import take

__all__ = ["nc", "server"]  # fixtures: a nats-server of this module's own and a connection to it

pytestmark = pytest.mark.asyncio
MODEL = "deaf-journal"
TIMEOUTS = Timeouts(queue_s=30.0, silence_s=1.0)


def answer(request_id: str, attempt: int) -> list:
    """An undisturbed answer of three tokens, as a worker sends it."""
    events: list = [Accepted(request_id=request_id, attempt=attempt, seq=0, worker_id="w1")]
    for seq, token in enumerate((7, 8, 9), start=1):
        finish = FinishReason.LENGTH if token == 9 else None
        delta = ChoiceDelta(index=0, text=f" w{token}", token_ids=[token], finish_reason=finish)
        events.append(Tokens(request_id=request_id, attempt=attempt, seq=seq, choices=[delta]))
    usage = Usage(prompt_tokens=2, completion_tokens=3)
    return [*events, End(request_id=request_id, attempt=attempt, seq=4, usage=usage)]


async def edge(nc, edge_id: str) -> NatsEngineClient:
    js = nc.jetstream()
    assert await ensure_journal_stream(js, max_age_s=60, max_bytes=1024**2)
    await ensure_request_queue(js, MODEL, QueueLimits(100, 600, 60))
    router = EventRouter(nc, edge_id)
    await router.start()
    return NatsEngineClient(nc, router, TIMEOUTS).keyed(f"key-of-{edge_id}")


def retried(engine: NatsEngineClient, request_id: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=[1, 2],
        reply_subject=engine.reply_subject(request_id),
        sampling=SamplingParams(max_tokens=3, seed=5),
    )


async def finished_elsewhere(nc, request_id: str) -> None:
    """The request's first POST, on another edge, got its whole answer: the journal holds it."""
    for event in answer(request_id, attempt=1):
        await publish_event(nc, subjects.token_subject("first-edge", request_id), event)
    await stored_in_journal(nc.jetstream(), request_id, 5)


async def collect(engine: NatsEngineClient, request: GenerateRequest) -> tuple[list[int], float]:
    started = time.monotonic()
    generation = await engine.submit_or_attach(request)
    tokens = [t async for event in generation if event.kind == "tokens" for c in event.choices for t in c.token_ids]
    return tokens, time.monotonic() - started


async def test_a_retry_whose_journal_consumer_misses_the_stored_answer_still_gets_it(nc, monkeypatch) -> None:
    deaf_consumers(monkeypatch, how_many=1000, stored_only=True)  # every consumer: as one on a replica lacking them
    engine = await edge(nc, "edge-missed")
    await finished_elsewhere(nc, "chatcmpl-missed")
    tokens, took = await asyncio.wait_for(collect(engine, retried(engine, "chatcmpl-missed")), 10)  # before: 30 s
    assert tokens == [7, 8, 9]
    assert took < TIMEOUTS.silence_s * 3  # read back from the stream within a second or so
    assert (await nc.jetstream().stream_info(subjects.request_stream(MODEL))).state.messages == 0  # nothing queued


async def test_a_retry_that_can_read_nothing_back_continues_on_an_attempt_of_its_own(nc, monkeypatch) -> None:
    """The stored events cannot be read at all (the consumer misses them and the stream cannot be asked): after a
    silence timeout the retry starts the request again as attempt 2, whose live events it does hear."""
    deaf_consumers(monkeypatch, how_many=1000, stored_only=True)
    get_msg = JetStreamContext.get_msg

    async def journal_unreadable(self, stream_name, *args, **kwargs):
        if stream_name == subjects.JOURNAL_STREAM:
            raise TimeoutError("no leader")
        return await get_msg(self, stream_name, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "get_msg", journal_unreadable)
    engine = await edge(nc, "edge-unreadable")
    await finished_elsewhere(nc, "chatcmpl-unreadable")
    intake = RequestIntake(nc.jetstream(), MODEL)
    await intake.start()
    collecting = asyncio.ensure_future(collect(engine, retried(engine, "chatcmpl-unreadable")))
    try:
        again = await take(intake, 10)  # before: nothing queued, no_worker after the 30 s queue timeout
        assert (again.attempt, again.resume_token_ids) == (2, [])
        for event in answer(again.request_id, attempt=2):
            await publish_event(nc, again.reply_subject, event)
        tokens, took = await asyncio.wait_for(collecting, 10)
        assert tokens == [7, 8, 9] and took < TIMEOUTS.silence_s * 5
    finally:
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await intake.stop()
