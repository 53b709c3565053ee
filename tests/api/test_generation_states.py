"""The Generation state machine, driven event by event against a scripted engine client (its GenerationPort):
what it hands the client, which state it is in, and what it asks of the engine (resubmit, cancel, release)."""

from __future__ import annotations

import asyncio

import pytest

from api.errors import ApiError
from api.generation import Generation, GenerationState, Timeouts
from contracts import (
    Accepted,
    ChoiceDelta,
    End,
    ErrorCode,
    ErrorInfo,
    Failed,
    FinishReason,
    GenerateRequest,
    Heartbeat,
    SamplingParams,
    Tokens,
    Usage,
)

pytestmark = pytest.mark.asyncio

QUIET_S = 0.05  # how long "silent" is in these tests: the timeouts of the scripted client


class ScriptedEngine:
    """A fake engine client: records what the generation asks of it; the test scripts the events."""

    def __init__(
        self,
        max_attempts: int = 3,
        quiet_s: float = QUIET_S,
        already_queued: frozenset[int] = frozenset(),
        queue_s: float | None = None,
        in_queue: bool | None = None,
    ):
        self.timeouts = Timeouts(queue_s=queue_s or quiet_s, silence_s=quiet_s, max_attempts=max_attempts)
        self.already_queued = already_queued  # attempts the queue reports as another edge's duplicate
        self.in_queue = in_queue  # what a look at the queue says of the current attempt (None: cannot tell)
        self.queue_looks = 0
        self.published: list[GenerateRequest] = []
        self.cancelled: list[tuple[str, int | None]] = []
        self.released: list[str] = []

    async def publish(self, request: GenerateRequest) -> bool:
        self.published.append(request)
        return request.attempt not in self.already_queued

    async def still_queued(self, request: GenerateRequest) -> bool | None:
        self.queue_looks += 1
        return self.in_queue

    async def cancel(self, request_id: str, attempt: int | None = None) -> None:
        self.cancelled.append((request_id, attempt))

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


class HeldTokens:
    """A reservation that records what it was settled to."""

    settled: int | None = None

    async def settle(self, used: int) -> None:
        self.settled = used


def request(max_tokens: int = 3, n: int = 1) -> GenerateRequest:
    return GenerateRequest(
        request_id="r",
        model="m",
        prompt_token_ids=[1, 2],
        reply_subject="inf.tok.e.r",
        sampling=SamplingParams(max_tokens=max_tokens, n=n),
    )


def accepted(attempt: int = 1, resumed: int = 0) -> Accepted:
    return Accepted(request_id="r", attempt=attempt, seq=0, worker_id=f"w{attempt}", resumed_tokens=resumed)


def tokens(seq: int, token: int, attempt: int = 1, finish: FinishReason | None = None) -> Tokens:
    return Tokens(
        request_id="r",
        attempt=attempt,
        seq=seq,
        choices=[ChoiceDelta(index=0, text=f" t{token}", token_ids=[token], finish_reason=finish)],
    )


def end(seq: int, completion: int, attempt: int = 1) -> End:
    return End(request_id="r", attempt=attempt, seq=seq, usage=Usage(prompt_tokens=2, completion_tokens=completion))


def scripted(*events) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    return queue


async def until(condition, deadline_s: float = 10.0) -> None:
    """Poll until `condition()` holds; fail (rather than hang) if it never does."""
    async with asyncio.timeout(deadline_s):
        while not condition():
            await asyncio.sleep(0.005)


def token_ids(received: list) -> list[int]:
    return [t for event in received if event.kind == "tokens" for c in event.choices for t in c.token_ids]


async def test_accepted_tokens_end_walks_queued_streaming_finished() -> None:
    engine, held = ScriptedEngine(), HeldTokens()
    events = scripted(accepted())
    generation = Generation(engine, request(), events, reservation=held)
    stream = aiter(generation)
    assert generation.state is GenerationState.QUEUED
    events.put_nowait(tokens(1, 10))
    first = await anext(stream)
    assert token_ids([first]) == [10] and generation.state is GenerationState.STREAMING
    for event in (
        Heartbeat(request_id="r", seq=2),
        tokens(3, 11),
        tokens(4, 12, finish=FinishReason.LENGTH),
        end(5, 3),
    ):
        events.put_nowait(event)
    rest = [event async for event in stream]
    assert token_ids(rest) == [11, 12] and rest[-1].kind == "end"  # the heartbeat is not handed over
    assert generation.state is GenerationState.FINISHED
    assert engine.cancelled == [] and engine.published == [] and engine.released == ["r"]
    assert held.settled == 5  # the worker's usage: 2 prompt + 3 completion


async def test_a_silent_worker_is_replaced_by_a_resubmission_from_the_delivered_tokens() -> None:
    engine = ScriptedEngine()
    events = scripted(accepted(), tokens(1, 10), tokens(2, 11))  # then the worker goes silent
    generation = Generation(engine, request(max_tokens=4), events)
    stream = aiter(generation)
    received = [await anext(stream), await anext(stream)]
    next_event = asyncio.ensure_future(anext(stream))
    await until(lambda: engine.published)
    [resubmitted] = engine.published
    assert (resubmitted.attempt, resubmitted.resume_token_ids) == (2, [10, 11])
    assert generation.state is GenerationState.QUEUED and generation.request.attempt == 2
    for event in (
        tokens(3, 99),
        accepted(2, resumed=2),
        tokens(1, 12, attempt=2),
        tokens(2, 13, attempt=2, finish=FinishReason.LENGTH),
        end(3, 4, attempt=2),
    ):
        events.put_nowait(event)  # the first worker's late token (99) belongs to a superseded attempt
    received.append(await next_event)
    received += [event async for event in stream]
    assert token_ids(received) == [10, 11, 12, 13] and received[-1].kind == "end"
    assert engine.cancelled == []


async def test_a_gap_in_the_events_resubmits_from_what_came_before_it() -> None:
    engine = ScriptedEngine()
    events = scripted(accepted(), tokens(1, 10), tokens(3, 12))  # seq 2 was lost
    generation = Generation(engine, request(), events)
    stream = aiter(generation)
    assert token_ids([await anext(stream)]) == [10]
    waiting = asyncio.ensure_future(anext(stream))
    await until(lambda: engine.published)
    assert engine.published[0].resume_token_ids == [10] and generation.state is GenerationState.QUEUED
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await generation.close()
    assert engine.cancelled == [("r", 2)]  # the attempt that was running is the one cancelled


async def test_no_acceptance_within_the_queue_timeout_is_no_worker_and_cancels() -> None:
    engine = ScriptedEngine()
    with pytest.raises(ApiError) as failure:
        async for _ in Generation(engine, request(), scripted()):
            pass
    assert failure.value.info.code is ErrorCode.NO_WORKER and failure.value.status == 503
    assert engine.published == [] and engine.cancelled == [("r", 1)]  # the queued request must not run later


async def test_a_request_that_left_the_queue_unheard_of_is_resubmitted_long_before_the_queue_timeout() -> None:
    """A worker took it (it is gone from the queue) but no event of it arrived, not even `accepted`: lost with a
    NATS node, or its worker died right after taking it. Waiting out the queue timeout (600 s for a batch line)
    is what kept batches stuck; it is resubmitted once a silence timeout passed after it was seen gone."""
    engine = ScriptedEngine(queue_s=60.0, in_queue=False)
    events: asyncio.Queue = asyncio.Queue()
    generation = Generation(engine, request(max_tokens=2), events)
    consumer = asyncio.ensure_future(anext(aiter(generation)))
    await until(lambda: engine.published, deadline_s=5.0)  # not 60 s
    [resubmitted] = engine.published
    assert resubmitted.attempt == 2 and resubmitted.resume_token_ids == []
    assert engine.queue_looks >= 2  # seen gone, then still silent a silence timeout later
    for event in (accepted(2), tokens(1, 10, attempt=2)):
        events.put_nowait(event)
    first = await asyncio.wait_for(consumer, 5.0)
    assert token_ids([first]) == [10]


async def test_a_request_still_in_the_queue_waits_its_whole_queue_timeout() -> None:
    engine = ScriptedEngine(queue_s=0.5, in_queue=True)
    with pytest.raises(ApiError) as raised:
        async for _ in Generation(engine, request(), scripted()):
            pass
    assert raised.value.info.code is ErrorCode.NO_WORKER
    assert engine.published == [] and engine.queue_looks >= 3  # looked, found it waiting, went on waiting


async def test_the_last_attempt_going_silent_is_worker_lost() -> None:
    engine = ScriptedEngine(max_attempts=1)
    received = []
    with pytest.raises(ApiError) as failure:
        async for event in Generation(engine, request(), scripted(accepted(), tokens(1, 10))):
            received.append(event)
    assert failure.value.info.code is ErrorCode.WORKER_LOST and token_ids(received) == [10]
    assert engine.published == []


async def test_an_attempt_another_edge_queued_that_never_shows_up_is_resubmitted_not_failed() -> None:
    engine = ScriptedEngine(already_queued=frozenset({2}))
    events = scripted(accepted(), tokens(1, 10))  # then silence: attempt 2 is a duplicate, and nothing comes of it
    generation = Generation(engine, request(), events)
    stream = aiter(generation)
    await anext(stream)
    waiting = asyncio.ensure_future(anext(stream))
    await until(lambda: len(engine.published) == 2)  # a queue timeout after the duplicate: the next attempt
    assert [r.attempt for r in engine.published] == [2, 3] and generation.state is GenerationState.QUEUED
    for event in (
        accepted(3, resumed=1),
        tokens(1, 11, attempt=3),
        tokens(2, 12, attempt=3, finish="length"),
        end(3, 3, attempt=3),
    ):
        events.put_nowait(event)
    received = [await waiting] + [event async for event in stream]
    assert token_ids(received) == [11, 12]


async def test_a_worker_lost_after_the_last_token_ends_the_stream_without_resubmitting() -> None:
    engine = ScriptedEngine()
    events = scripted(accepted(), tokens(1, 10), tokens(2, 11))  # max_tokens reached; the end never comes
    received = [event async for event in Generation(engine, request(max_tokens=2), events)]
    assert token_ids(received) == [10, 11]
    assert received[-2].choices[0].finish_reason is FinishReason.LENGTH
    assert received[-1].kind == "end" and received[-1].usage.completion_tokens == 2
    assert engine.published == [] and engine.cancelled == []


async def test_an_error_event_raises_its_error_and_cancels_nothing() -> None:
    engine = ScriptedEngine()
    failed = Failed(request_id="r", seq=2, error=ErrorInfo(code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="long"))
    generation = Generation(engine, request(), scripted(accepted(), tokens(1, 10), failed))
    with pytest.raises(ApiError) as failure:
        async for _ in generation:
            pass
    assert failure.value.info.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert generation.state is GenerationState.FINISHED and engine.cancelled == [] and engine.published == []


async def test_a_client_leaving_cancels_the_attempt_and_settles_what_was_spent() -> None:
    engine, held = ScriptedEngine(), HeldTokens()
    generation = Generation(
        engine, request(max_tokens=8), scripted(accepted(), tokens(1, 10), tokens(2, 11)), reservation=held
    )
    stream = aiter(generation)
    await anext(stream)
    await stream.aclose()  # the client went away after one token
    assert engine.cancelled == [("r", 1)] and engine.released == ["r"]
    assert held.settled == 3  # 2 prompt tokens + the 1 delivered, not the 2 + 8 reserved
    await generation.close()
    assert engine.cancelled == [("r", 1)]  # closing again cancels nothing more


async def test_several_candidates_are_never_resumed() -> None:
    engine = ScriptedEngine()
    with pytest.raises(ApiError) as failure:
        async for _ in Generation(engine, request(n=2), scripted(accepted(), tokens(1, 10))):
            pass
    assert failure.value.info.code is ErrorCode.WORKER_LOST and engine.published == []


class Follower:
    async def close(self) -> None:
        pass


async def test_a_follower_continues_a_request_abandoned_by_its_previous_client() -> None:
    engine = ScriptedEngine(quiet_s=30.0)  # nothing here may be mistaken for a silent worker
    aborted = Tokens(request_id="r", seq=2, choices=[ChoiceDelta(index=0, finish_reason=FinishReason.ABORT)])
    events = scripted(accepted(), tokens(1, 10), aborted)
    generation = Generation(engine, request(), events, follower=Follower())
    stream = aiter(generation)
    assert token_ids([await anext(stream)]) == [10]
    waiting = asyncio.ensure_future(anext(stream))
    await until(lambda: generation.state is GenerationState.ABANDONED)
    events.put_nowait(end(3, 1))  # the worker ended the cancelled attempt: not this client's end
    await until(lambda: engine.published)
    assert engine.published[0].resume_token_ids == [10] and generation.state is GenerationState.QUEUED
    for event in (
        accepted(2, resumed=1),
        tokens(1, 11, attempt=2),
        tokens(2, 12, attempt=2, finish="length"),
        end(3, 3, attempt=2),
    ):
        events.put_nowait(event)
    received = [await waiting] + [event async for event in stream]
    assert token_ids(received) == [11, 12] and received[-1].kind == "end"


async def test_an_abort_the_submitting_edge_did_not_ask_for_is_continued_not_handed_to_its_client() -> None:
    """The worker stopped the attempt for someone else (another client of the request left, a newer attempt
    superseded it, the worker shut down): the answer is not complete. Before, the client got finish "abort"."""
    engine = ScriptedEngine(quiet_s=30.0)
    aborted = Tokens(request_id="r", seq=2, choices=[ChoiceDelta(index=0, finish_reason=FinishReason.ABORT)])
    events = scripted(accepted(), tokens(1, 10), aborted, end(3, 1))
    generation = Generation(engine, request(), events)
    stream = aiter(generation)
    assert token_ids([await anext(stream)]) == [10]
    waiting = asyncio.ensure_future(anext(stream))
    await until(lambda: engine.published)
    assert [(r.attempt, r.resume_token_ids) for r in engine.published] == [(2, [10])]
    for event in (
        accepted(2, resumed=1),
        tokens(1, 11, attempt=2),
        tokens(2, 12, attempt=2, finish=FinishReason.LENGTH),
        end(3, 3, attempt=2),
    ):
        events.put_nowait(event)
    received = [await waiting] + [event async for event in stream]
    assert token_ids(received) == [11, 12] and received[-1].kind == "end"
    finishes = [c.finish_reason for event in received if event.kind == "tokens" for c in event.choices]
    assert FinishReason.ABORT not in finishes and engine.cancelled == []


async def test_an_abort_on_the_last_attempt_is_a_clear_error_not_a_truncated_answer() -> None:
    engine = ScriptedEngine(quiet_s=30.0)
    aborted = Tokens(request_id="r", attempt=3, seq=2, choices=[ChoiceDelta(index=0, finish_reason=FinishReason.ABORT)])
    last = request().model_copy(update={"attempt": 3})  # Timeouts.max_attempts
    events = scripted(accepted(3), tokens(1, 10, attempt=3), aborted, end(3, 1, attempt=3))
    received = []
    with pytest.raises(ApiError) as failure:
        async for event in Generation(engine, last, events):
            received.append(event)
    assert failure.value.info.code is ErrorCode.WORKER_LOST
    assert token_ids(received) == [10] and engine.published == []
