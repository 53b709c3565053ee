"""A Generation that sees a gap in its token events (lost while NATS reconnected) continues on a new attempt from
the tokens it did deliver, so the client never gets a text with a hole in it."""

from __future__ import annotations

import asyncio

import pytest

from api.engine_client import Generation, Timeouts
from api.errors import ApiError
from contracts import Accepted, ChoiceDelta, End, ErrorCode, GenerateRequest, SamplingParams, Tokens, Usage

pytestmark = pytest.mark.asyncio


class RecordingClient:
    """What a Generation needs of its EngineClient (its GenerationPort): publish (resubmissions), cancel, release,
    timeouts."""

    def __init__(self, already_queued: frozenset[int] = frozenset()) -> None:
        self.published: list[GenerateRequest] = []
        self.timeouts = Timeouts(queue_s=5.0, silence_s=5.0)
        self.already_queued = already_queued  # attempts whose publish the queue reports as a duplicate
        self.cancelled: list[tuple[str, int | None]] = []

    async def publish(self, request: GenerateRequest) -> bool:
        self.published.append(request)
        return request.attempt not in self.already_queued

    async def still_queued(self, request: GenerateRequest) -> bool | None:
        return None

    async def cancel(self, request_id: str, attempt: int | None = None) -> None:
        self.cancelled.append((request_id, attempt))

    def release(self, request_id: str) -> None:
        pass


def tokens(attempt: int, seq: int, token: int, finish: str | None = None) -> Tokens:
    return Tokens(
        request_id="r",
        attempt=attempt,
        seq=seq,
        choices=[ChoiceDelta(index=0, text=f" t{token}", token_ids=[token], finish_reason=finish)],
    )


async def test_a_gap_resumes_from_the_delivered_tokens_on_a_new_attempt() -> None:
    client = RecordingClient()
    request = GenerateRequest(
        request_id="r",
        model="m",
        prompt_token_ids=[1],
        reply_subject="inf.tok.e.r",
        sampling=SamplingParams(max_tokens=4),
    )
    events: asyncio.Queue = asyncio.Queue()
    for event in (
        Accepted(request_id="r", attempt=1, seq=0, worker_id="w1"),
        tokens(1, 1, 10),
        tokens(1, 3, 12),
    ):  # seq 2 (token 11) was lost
        events.put_nowait(event)
    generation = Generation(client, request, events)
    received = []

    async def consume() -> None:
        async for event in generation:
            received.append(event)

    task = asyncio.create_task(consume())
    while not client.published:
        await asyncio.sleep(0.01)
    [resubmitted] = client.published
    assert resubmitted.attempt == 2 and resubmitted.resume_token_ids == [10]  # not 12: it came after the hole
    for event in (
        tokens(1, 4, 13),
        Accepted(request_id="r", attempt=2, seq=0, worker_id="w2"),
        tokens(2, 1, 11),
        tokens(2, 2, 12),
        tokens(2, 3, 13, "length"),
        End(request_id="r", attempt=2, seq=4, usage=Usage(prompt_tokens=1, completion_tokens=4)),
    ):
        events.put_nowait(event)  # the old attempt's late events are ignored
    await asyncio.wait_for(task, 5)
    delivered = [t for event in received if event.kind == "tokens" for c in event.choices for t in c.token_ids]
    assert delivered == [10, 11, 12, 13]


async def test_only_the_accepted_event_missing_is_no_gap() -> None:
    client = RecordingClient()
    request = GenerateRequest(
        request_id="r",
        model="m",
        prompt_token_ids=[1],
        reply_subject="inf.tok.e.r",
        sampling=SamplingParams(max_tokens=1),
    )
    events: asyncio.Queue = asyncio.Queue()
    for event in (
        tokens(1, 1, 10, "length"),
        End(request_id="r", attempt=1, seq=2, usage=Usage(prompt_tokens=1, completion_tokens=1)),
    ):
        events.put_nowait(event)
    received = [event async for event in Generation(client, request, events)]
    assert [event.kind for event in received] == ["tokens", "end"] and client.published == []


async def test_a_gap_that_cannot_be_resumed_is_a_clear_error_not_a_hole() -> None:
    """Found by the chaos run (seed 22): on its last attempt a request lost events in a NATS node failure, and
    the edge handed the client the tokens after the hole as if none were missing (finish "length")."""
    request = GenerateRequest(
        request_id="r",
        model="m",
        prompt_token_ids=[1],
        reply_subject="inf.tok.e.r",
        sampling=SamplingParams(max_tokens=4),
        attempt=3,
    )  # Timeouts.max_attempts
    events: asyncio.Queue = asyncio.Queue()
    for event in (
        Accepted(request_id="r", attempt=3, seq=0, worker_id="w3"),
        tokens(3, 1, 10),
        tokens(3, 3, 12),
        tokens(3, 4, 13, "length"),
        End(request_id="r", attempt=3, seq=5, usage=Usage(prompt_tokens=1, completion_tokens=4)),
    ):
        events.put_nowait(event)
    received = []
    with pytest.raises(ApiError) as raised:
        async for event in Generation(RecordingClient(), request, events):
            received.append(event)
    assert raised.value.info.code is ErrorCode.WORKER_LOST
    assert [t for event in received for c in event.choices for t in c.token_ids] == [10]  # nothing after the hole
