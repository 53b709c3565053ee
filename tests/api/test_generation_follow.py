"""A Generation following a request from the token journal (another edge submitted it) replays every attempt's
events: it must hand its client each token once, in order, whatever attempts overlap, and finish a request
that was cancelled when its previous client left."""

from __future__ import annotations

import asyncio

import pytest

from api.engine_client import Generation, Timeouts
from api.errors import ApiError
from contracts import Accepted, ChoiceDelta, End, ErrorCode, GenerateRequest, SamplingParams, Tokens, Usage
from tests.api.test_generation_gaps import RecordingClient, tokens

pytestmark = pytest.mark.asyncio


class Follower:
    closed = False

    async def close(self) -> None:
        self.closed = True


def request(max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(
        request_id="r",
        model="m",
        prompt_token_ids=[1],
        reply_subject="inf.tok.b.r",
        sampling=SamplingParams(max_tokens=max_tokens),
    )


def accepted(attempt: int, resumed: int = 0) -> Accepted:
    return Accepted(request_id="r", attempt=attempt, seq=0, worker_id=f"w{attempt}", resumed_tokens=resumed)


def end(attempt: int, seq: int, completion: int) -> End:
    return End(request_id="r", attempt=attempt, seq=seq, usage=Usage(prompt_tokens=1, completion_tokens=completion))


def delivered(received: list) -> list[int]:
    return [t for event in received if event.kind == "tokens" for c in event.choices for t in c.token_ids]


async def test_a_replay_across_attempts_hands_over_each_token_once() -> None:
    journal: asyncio.Queue = asyncio.Queue()
    # Attempt 1 streamed 10, 11, 12; the first edge lost 11 and 12 in a reconnect and resubmitted from [10];
    # attempt 1 went on a little (its 13 is stale), attempt 2 repeated 11 and 12 and finished.
    for event in (
        accepted(1),
        tokens(1, 1, 10),
        tokens(1, 2, 11),
        tokens(1, 3, 12),
        accepted(2, resumed=1),
        tokens(1, 4, 13),
        tokens(2, 1, 11),
        tokens(2, 2, 12),
        tokens(2, 3, 13, "length"),
        end(2, 4, 4),
    ):
        journal.put_nowait(event)
    follower = Follower()
    received = [event async for event in Generation(RecordingClient(), request(), journal, follower=follower)]
    assert delivered(received) == [10, 11, 12, 13]
    assert received[-1].kind == "end" and received[-2].choices[0].finish_reason == "length"
    assert follower.closed


async def test_a_request_cancelled_under_its_previous_client_is_continued() -> None:
    client, journal = RecordingClient(), asyncio.Queue()
    aborted = Tokens(request_id="r", attempt=1, seq=3, choices=[ChoiceDelta(index=0, finish_reason="abort")])
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 2, 11), aborted, end(1, 4, 2)):
        journal.put_nowait(event)
    received: list = []

    async def consume() -> None:
        async for event in Generation(client, request(), journal, follower=Follower()):
            received.append(event)

    task = asyncio.create_task(consume())
    while not client.published:
        await asyncio.sleep(0.01)
    [resubmitted] = client.published
    assert resubmitted.attempt == 2 and resubmitted.resume_token_ids == [10, 11]
    for event in (accepted(2, resumed=2), tokens(2, 1, 12), tokens(2, 2, 13, "length"), end(2, 3, 4)):
        journal.put_nowait(event)
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13]
    finishes = [c.finish_reason for event in received if event.kind == "tokens" for c in event.choices]
    assert "abort" not in finishes and finishes[-1] == "length"


async def test_the_submitting_edge_still_ignores_newer_attempts_it_did_not_make() -> None:
    """Only followers move to attempts they see; the submitting edge owns its attempts."""
    journal: asyncio.Queue = asyncio.Queue()
    for event in (accepted(1), tokens(1, 1, 10), tokens(2, 1, 99), tokens(1, 2, 11, "length"), end(1, 3, 2)):
        journal.put_nowait(event)
    received = [event async for event in Generation(RecordingClient(), request(2), journal)]
    assert delivered(received) == [10, 11]


async def follow_two_tokens_then_silence(client: RecordingClient) -> tuple[asyncio.Queue, asyncio.Task, list]:
    """A follower of a request whose journal shows attempt 1's first two tokens and then nothing."""
    journal: asyncio.Queue = asyncio.Queue()
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 2, 11)):
        journal.put_nowait(event)
    received: list = []

    async def consume() -> None:
        async for event in Generation(client, request(), journal, follower=Follower()):
            received.append(event)

    return journal, asyncio.create_task(consume()), received


async def published(client: RecordingClient, count: int) -> None:
    while len(client.published) < count:
        await asyncio.sleep(0.01)


async def test_a_resubmission_another_edge_queued_and_ran_unseen_moves_on_after_a_queue_timeout() -> None:
    """Found by the chaos run (seed 1): a NATS node died while attempt 1 finished, so the journal lost its tail;
    another edge's resubmission (attempt 2) ran and finished with its events lost too. A follower that fell
    silent resubmitted attempt 2, the queue dropped it as a duplicate, and every retry of the client waited for
    nothing until the duplicate window passed. Now, once that attempt shows nothing for a queue timeout, it
    moves on to attempt 3, resumed from what it delivered."""
    client = RecordingClient(already_queued=frozenset({2}))
    client.timeouts = Timeouts(queue_s=0.3, silence_s=0.2)
    journal, task, received = await follow_two_tokens_then_silence(client)
    await asyncio.wait_for(published(client, 2), 5)  # before: attempt 2 only, then waiting for nothing
    assert [(r.attempt, r.resume_token_ids) for r in client.published] == [(2, [10, 11]), (3, [10, 11])]
    for event in (accepted(3, resumed=2), tokens(3, 1, 12), tokens(3, 2, 13, "length"), end(3, 3, 4)):
        journal.put_nowait(event)
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13]


async def test_a_resubmission_another_edge_queued_and_runs_is_followed_not_superseded() -> None:
    """Both edges of a keyed request saw its worker die and resubmitted attempt 2 at once (chaos run, seed 22).
    The one whose publish was the duplicate must follow that attempt: a third attempt would supersede it on the
    worker, and the other edge's client would get finish_reason "abort"."""
    client = RecordingClient(already_queued=frozenset({2}))
    client.timeouts = Timeouts(queue_s=1.0, silence_s=0.2)
    journal, task, received = await follow_two_tokens_then_silence(client)
    await asyncio.wait_for(published(client, 1), 5)
    for event in (accepted(2, resumed=2), tokens(2, 1, 12), tokens(2, 2, 13, "length"), end(2, 3, 4)):
        journal.put_nowait(event)
    await asyncio.wait_for(task, 5)
    assert [r.attempt for r in client.published] == [2]
    assert delivered(received) == [10, 11, 12, 13]


def last_attempt_with_a_hole() -> asyncio.Queue:
    """A journal whose request used every attempt (Timeouts.max_attempts, 3): attempts 1 and 2 went silent, and
    attempt 3 lost its second token event in transit (a NATS node failure), then finished."""
    journal: asyncio.Queue = asyncio.Queue()
    for event in (
        accepted(1),
        tokens(1, 1, 10),
        accepted(2, resumed=1),
        accepted(3, resumed=1),
        tokens(3, 1, 11),
        tokens(3, 3, 13, "length"),  # seq 2 (token 12) was lost
        end(3, 4, 4),
    ):
        journal.put_nowait(event)
    return journal


def retried_post(client: RecordingClient, journal: asyncio.Queue, max_tokens: int = 4) -> tuple[asyncio.Task, list]:
    """A retried POST (same Idempotency-Key) following the journal, run in a task; what it hands its client."""
    received: list = []

    async def consume() -> None:
        generation = Generation(client, request(max_tokens), journal, follower=Follower(), own_attempts=True)
        async for event in generation:
            received.append(event)

    return asyncio.create_task(consume()), received


async def test_a_retried_post_starts_a_new_attempt_where_the_last_one_has_a_hole() -> None:
    """Found by the chaos run (seed 2026, 10 minutes): two keyed chats whose last attempt had a hole in its
    events answered every retry with the same key (77 and 83 of them) 503 `worker_lost`, until the client gave
    up: the key was stuck until the journal forgot it. A retried POST holds none of the text yet: it continues
    the request on a new attempt from the tokens before the hole."""
    client, journal = RecordingClient(), last_attempt_with_a_hole()
    task, received = retried_post(client, journal)
    await asyncio.wait_for(published(client, 1), 5)  # before: WORKER_LOST at the hole
    [attempt] = client.published
    assert (attempt.attempt, attempt.resume_token_ids, attempt.sampling) == (4, [10, 11], request().sampling)
    for event in (accepted(4, resumed=2), tokens(4, 1, 12), tokens(4, 2, 13, "length"), end(4, 3, 4)):
        journal.put_nowait(event)
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13]
    assert received[-1].kind == "end" and received[-2].choices[0].finish_reason == "length"


async def test_a_last_event_id_resume_of_a_last_attempt_with_a_hole_is_still_a_clear_error() -> None:
    """Its client holds text from the stream it lost; the request has used its attempts: a clear error."""
    client = RecordingClient()
    received: list = []
    with pytest.raises(ApiError) as raised:
        async for event in Generation(client, request(), last_attempt_with_a_hole(), follower=Follower()):
            received.append(event)
    assert raised.value.info.code is ErrorCode.WORKER_LOST
    assert delivered(received) == [10, 11] and client.published == []


async def test_a_retried_post_starts_a_bounded_number_of_attempts_of_its_own() -> None:
    """Workers that take the retried request and go silent: it starts max_attempts - 1 attempts of its own, then
    answers the clear error (a next retry of the client may start more)."""
    journal = last_attempt_with_a_hole()

    class SilentWorkers(RecordingClient):
        async def publish(self, request: GenerateRequest) -> bool:
            journal.put_nowait(accepted(request.attempt, resumed=len(request.resume_token_ids)))
            return await super().publish(request)

    client = SilentWorkers()
    client.timeouts = Timeouts(queue_s=1.0, silence_s=0.1)
    generation = Generation(client, request(), journal, follower=Follower(), own_attempts=True)
    with pytest.raises(ApiError) as raised:
        async for _ in generation:
            pass
    assert raised.value.info.code is ErrorCode.WORKER_LOST
    assert [r.attempt for r in client.published] == [4, 5]


def the_rest_of_six_from_two(journal: asyncio.Queue, attempt: int) -> None:
    """An attempt resumed from the first two tokens (10, 11) streams 12-15 and ends (max_tokens 6)."""
    for seq in range(1, 5):
        journal.put_nowait(tokens(attempt, seq, 11 + seq, "length" if seq == 4 else None))
    journal.put_nowait(end(attempt, 5, 6))


async def test_a_hole_in_another_edges_running_attempt_is_waited_out_not_superseded() -> None:
    """Chaos seed 2026, 30 minutes: a retried POST of a keyed chat followed the journal, which had lost four token
    events of attempt 1 while that attempt still streamed to the first POST's edge (on its own reply subject).
    The follower resubmitted at the hole; its attempt 2 superseded attempt 1 on the worker, and the first client
    got finish_reason "abort" after 23 of 24 tokens. Now the follower ignores the rest of attempt 1 and continues
    from the tokens before the hole only once attempt 1 has ended."""
    client, journal = RecordingClient(), asyncio.Queue()
    client.timeouts = Timeouts(queue_s=5.0, silence_s=1.0)
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 2, 11), tokens(1, 5, 14)):  # seq 3 and 4 were lost
        journal.put_nowait(event)
    task, received = retried_post(client, journal, 6)
    await asyncio.sleep(0.3)
    journal.put_nowait(tokens(1, 6, 15, "length"))  # attempt 1 still streams for its own client: not used here
    await asyncio.sleep(0.3)
    assert client.published == []  # before: attempt 2 at the hole, superseding attempt 1 under its client
    journal.put_nowait(end(1, 7, 6))
    await asyncio.wait_for(published(client, 1), 5)
    [attempt] = client.published
    assert (attempt.attempt, attempt.resume_token_ids) == (2, [10, 11])
    journal.put_nowait(accepted(2, resumed=2))
    the_rest_of_six_from_two(journal, attempt=2)
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13, 14, 15]
    finishes = [c.finish_reason for event in received if event.kind == "tokens" for c in event.choices]
    assert [f for f in finishes if f] == ["length"]
    assert len(client.published) == 1


async def test_a_hole_in_another_edges_attempt_that_falls_silent_is_resumed_after_the_silence() -> None:
    client = RecordingClient()
    client.timeouts = Timeouts(queue_s=5.0, silence_s=0.3)
    journal: asyncio.Queue = asyncio.Queue()
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 3, 12)):  # seq 2 lost, then its worker died
        journal.put_nowait(event)
    task, received = retried_post(client, journal)
    await asyncio.wait_for(published(client, 1), 5)
    assert [(r.attempt, r.resume_token_ids) for r in client.published] == [(2, [10])]
    for event in (accepted(2, resumed=1), tokens(2, 1, 11), tokens(2, 2, 12), tokens(2, 3, 13, "length")):
        journal.put_nowait(event)
    journal.put_nowait(end(2, 4, 4))
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13]


async def test_a_hole_in_an_attempt_the_follower_queued_itself_is_resumed_at_once() -> None:
    """Nobody else reads an attempt a follower queued (its events reach only the journal): no need to wait."""
    client = RecordingClient()
    client.timeouts = Timeouts(queue_s=5.0, silence_s=0.3)
    journal, task, received = await follow_two_tokens_then_silence(client)
    await asyncio.wait_for(published(client, 1), 5)  # attempt 1 fell silent: attempt 2 is this generation's
    client.timeouts = Timeouts(queue_s=30.0, silence_s=30.0)  # from here on, only the hole can move it on
    for event in (accepted(2, resumed=2), tokens(2, 2, 13)):  # seq 1 (token 12) lost
        journal.put_nowait(event)
    await asyncio.wait_for(published(client, 2), 5)
    assert [(r.attempt, r.resume_token_ids) for r in client.published] == [(2, [10, 11]), (3, [10, 11])]
    for event in (accepted(3, resumed=2), tokens(3, 1, 12), tokens(3, 2, 13, "length"), end(3, 3, 4)):
        journal.put_nowait(event)
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13]


async def test_an_attempt_resumed_past_the_tokens_the_follower_has_is_not_spliced_in() -> None:
    """The journal lost tokens 12 and 13 of attempt 1 (and its end); the first edge, which had them, resumed the
    request from four tokens as attempt 2. Its tokens would follow 11 with 14: a hole. The follower waits that
    attempt out and continues from its own two tokens."""
    client, journal = RecordingClient(), asyncio.Queue()
    for event in (
        accepted(1),
        tokens(1, 1, 10),
        tokens(1, 2, 11),
        accepted(2, resumed=4),
        tokens(2, 1, 14),
        tokens(2, 2, 15, "length"),
    ):
        journal.put_nowait(event)
    task, received = retried_post(client, journal, 6)
    await asyncio.sleep(0.3)
    assert delivered(received) == [10, 11]  # before: [10, 11, 14, 15], finished
    journal.put_nowait(end(2, 3, 6))
    await asyncio.wait_for(published(client, 1), 5)
    assert [(r.attempt, r.resume_token_ids) for r in client.published] == [(3, [10, 11])]
    journal.put_nowait(accepted(3, resumed=2))
    the_rest_of_six_from_two(journal, attempt=3)
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13, 14, 15]


async def test_a_follower_whose_client_leaves_while_it_waits_out_another_edges_attempt_does_not_cancel_it() -> None:
    """That attempt is another client's answer: cancelling it would hand that client an abort."""
    client, journal = RecordingClient(), asyncio.Queue()
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 3, 12)):  # seq 2 lost; attempt 1 still runs
        journal.put_nowait(event)
    generation = Generation(client, request(), journal, follower=Follower(), own_attempts=True)
    stream = aiter(generation)
    assert delivered([await anext(stream)]) == [10]
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)
    waiting.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await generation.close()
    assert client.cancelled == [] and client.published == []


async def test_a_retried_post_that_hears_nothing_from_the_journal_starts_an_attempt_of_its_own() -> None:
    """Chaos seed 2026, 30 minutes (`keyed2.404.dup`): three retried POSTs of a finished keyed chat found it in the
    journal, attached, heard none of its events and answered 503 `no_worker` a queue timeout (60 s) later. A
    retried POST (its client holds none of the text) that hears nothing within a silence timeout of attaching to
    a request the journal holds continues it on an attempt of its own, from the start."""
    client, journal = RecordingClient(), asyncio.Queue()
    client.timeouts = Timeouts(queue_s=30.0, silence_s=0.2)
    received: list = []

    async def consume() -> None:
        generation = Generation(client, request(), journal, follower=Follower(), own_attempts=True, stored=True)
        async for event in generation:
            received.append(event)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(published(client, 1), 5)  # before: nothing until the queue timeout, then no_worker
    [attempt] = client.published
    assert (attempt.attempt, attempt.resume_token_ids, attempt.sampling) == (2, [], request().sampling)
    for event in (accepted(2), tokens(2, 1, 10), tokens(2, 2, 11), tokens(2, 3, 12), tokens(2, 4, 13, "length")):
        journal.put_nowait(event)
    journal.put_nowait(end(2, 5, 4))
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13]
    assert len(client.published) == 1 and client.cancelled == []


async def test_a_last_event_id_resume_that_hears_nothing_from_the_journal_is_a_clear_error_at_once() -> None:
    """Its client holds text this edge never saw: no attempt from the start (unseeded, it would not match)."""
    client = RecordingClient()
    client.timeouts = Timeouts(queue_s=30.0, silence_s=0.2)
    generation = Generation(client, request(), asyncio.Queue(), follower=Follower(), stored=True)
    with pytest.raises(ApiError) as raised:
        await asyncio.wait_for(anext(aiter(generation)), 5)  # before: no_worker after the 30 s queue timeout
    assert raised.value.info.code is ErrorCode.WORKER_LOST
    assert client.published == [] and client.cancelled == []  # whatever runs is another client's


async def test_a_follower_of_a_request_not_yet_in_the_journal_waits_for_it() -> None:
    """Guard: a retried POST whose request another edge queued (a duplicate in the queue, nothing journaled yet)
    waits for that attempt: one of its own would supersede it on the worker under the other client."""
    client, journal = RecordingClient(), asyncio.Queue()
    client.timeouts = Timeouts(queue_s=30.0, silence_s=0.1)
    task, received = retried_post(client, journal)
    await asyncio.sleep(0.5)
    assert client.published == []
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 2, 11), tokens(1, 3, 12), tokens(1, 4, 13, "length")):
        journal.put_nowait(event)
    journal.put_nowait(end(1, 5, 4))
    await asyncio.wait_for(task, 5)
    assert delivered(received) == [10, 11, 12, 13] and client.published == []


async def test_a_stored_answer_whose_end_was_lost_is_finished_not_generated_past_its_stop() -> None:
    """The journal holds a finished request's every token, its stop included, but a node fault dropped its `end`.
    A retried POST hands over that answer and finishes it after the silence; before, it resubmitted the request
    from the tokens after the stop, and a worker generated past it."""
    client, journal = RecordingClient(), asyncio.Queue()
    client.timeouts = Timeouts(queue_s=30.0, silence_s=0.2)
    for event in (accepted(1), tokens(1, 1, 10), tokens(1, 2, 11, "stop")):  # max_tokens 4; end(1, 3, 2) lost
        journal.put_nowait(event)
    task, received = retried_post(client, journal)
    await asyncio.wait_for(task, 5)
    assert client.published == []
    assert delivered(received) == [10, 11] and received[-1].kind == "end"
    finishes = [c.finish_reason for event in received if event.kind == "tokens" for c in event.choices]
    assert [f for f in finishes if f] == ["stop"]
