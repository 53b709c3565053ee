"""A request a worker took off the queue whose events never reached the edge (not even `accepted`: the edge's
NATS node died with them, or the worker died right after taking it). Before, the edge waited out its whole queue
timeout for an acceptance that could not come: 600 s for a batch line, with the batch heartbeated and `in_progress`
all along (the chaos run's stuck batches). Now the edge sees the request gone from the queue and, a silence
timeout later, still unheard of, resubmits it; the next worker answers. Real nats-server; the "worker" is this
test pulling from the queue with the worker's own intake."""

from __future__ import annotations

import asyncio
import time

import pytest

from api.generation import Timeouts
from api.nats_engine_client import NatsEngineClient
from broker.events import EventRouter, publish_event
from broker.topology import QueueLimits, ensure_request_queue
from broker.work_queue import Lane, RequestIntake
from contracts import Accepted, ChoiceDelta, End, FinishReason, GenerateRequest, SamplingParams, Tokens, Usage
from tests.broker.conftest import nc, server

__all__ = ["nc", "server"]  # fixtures: a nats-server of this module's own and a connection to it

pytestmark = pytest.mark.asyncio
MODEL = "lost-acceptance"
SILENCE_S = 0.5


async def take(intake: RequestIntake, deadline_s: float) -> GenerateRequest:
    """The next request off the queue, acked as a worker acks a live request when it accepts it."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for delivery in await intake.fetch(1, timeout=0.5):
            await delivery.msg.ack()
            return delivery.request
    raise AssertionError(f"nothing on the queue within {deadline_s} s")


@pytest.mark.parametrize("lane", [Lane.BATCH, Lane.INTERACTIVE])
async def test_a_request_taken_but_never_heard_of_is_resubmitted_not_waited_for(nc, lane: Lane) -> None:
    js = nc.jetstream()
    await ensure_request_queue(js, MODEL, QueueLimits(100, 600, 60))
    router = EventRouter(nc, "edge1")
    await router.start()
    engine = NatsEngineClient(nc, router, Timeouts(queue_s=600.0, silence_s=SILENCE_S), lane=lane)
    intake = RequestIntake(js, MODEL)
    await intake.start()
    request = GenerateRequest(
        request_id=f"lost-{lane.value}",
        model=MODEL,
        prompt_token_ids=[1, 2],
        reply_subject=engine.reply_subject(f"lost-{lane.value}"),
        sampling=SamplingParams(max_tokens=1),
    )
    generation = await engine.submit(request)
    answer = asyncio.ensure_future(anext(aiter(generation)))
    try:
        first = await take(intake, 5)  # taken, and then nothing: its events are lost
        assert first.attempt == 1
        started = time.monotonic()
        second = await take(intake, 15)  # the edge resubmitted it, long before 600 s
        assert second.attempt == 2 and second.request_id == request.request_id
        assert time.monotonic() - started < 10 * SILENCE_S
        for event in (
            Accepted(request_id=second.request_id, attempt=2, seq=0, worker_id="w2"),
            Tokens(
                request_id=second.request_id,
                attempt=2,
                seq=1,
                choices=[ChoiceDelta(index=0, text=" w9", token_ids=[9], finish_reason=FinishReason.LENGTH)],
            ),
            End(request_id=second.request_id, attempt=2, seq=2, usage=Usage(prompt_tokens=2, completion_tokens=1)),
        ):
            await publish_event(nc, second.reply_subject, event)
        tokens = await asyncio.wait_for(answer, 10)
        assert [t for choice in tokens.choices for t in choice.token_ids] == [9]
    finally:
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        await generation.close()
        await intake.stop()
        await router.stop()


async def test_a_request_waiting_in_the_queue_is_left_there(nc) -> None:
    """Nobody takes it: it stays queued (no resubmission piles up behind it) until the queue timeout."""
    js = nc.jetstream()
    await ensure_request_queue(js, MODEL, QueueLimits(100, 600, 60))
    router = EventRouter(nc, "edge2")
    await router.start()
    engine = NatsEngineClient(nc, router, Timeouts(queue_s=6 * SILENCE_S, silence_s=SILENCE_S))
    request = GenerateRequest(
        request_id="waiting",
        model=MODEL,
        prompt_token_ids=[1],
        reply_subject=engine.reply_subject("waiting"),
        sampling=SamplingParams(max_tokens=1),
    )
    generation = await engine.submit(request)
    with pytest.raises(Exception) as raised:
        await anext(aiter(generation))
    assert "no worker accepted" in str(raised.value)
    await router.stop()
    intake = RequestIntake(js, MODEL)
    await intake.start()
    assert (await take(intake, 5)).attempt == 1  # the one and only submission is still there
    assert await intake.fetch(1, timeout=0.5) == []
    await intake.stop()
