"""One submitted request as the edge sees it: a small state machine over the request's events.

    QUEUED ──accepted──▶ STREAMING ──end──▶ FINISHED          (error: FINISHED, raised as ApiError)
      ▲                    │   └─abort not asked for, or (followers) a gap─▶ ABANDONED ──end or silent──┐
      └──── resubmitted ◀──┴── worker silent, or events lost (a gap) ◀──────────────────────────────────┘
    (QUEUED_ELSEWHERE: a resubmission another edge had queued already; if it shows nothing for a queue timeout,
    resubmitted again rather than failed. QUEUED and silent: once the request has left the queue and nothing was
    heard of it for a silence timeout, its events were lost: resubmitted, as after a silent worker. Following a
    request the journal holds and hearing none of it for a silence timeout: the journal cannot be read back; a
    retried POST starts it again on an attempt of its own, a Last-Event-ID resume is a clear error)
    any state but FINISHED ──close()──▶ cancelled on the worker

How many attempts a generation may start: a request survives `Timeouts.max_attempts - 1` resubmissions. A
client's retried POST (same Idempotency-Key) that attaches to the request counts the attempts it starts itself,
so a key whose last attempt broke (a hole in its events, a silent worker) is started again by the next retry
instead of failing every retry until the journal forgets it; a Last-Event-ID resume (its client holds text)
counts every attempt of the request.

A generation talks to the engine client that started it only through `GenerationPort` (publish a resubmission,
cancel, stop routing its events, the timeouts), so it can be driven by a scripted fake in tests.

An edge can also follow a request it did not submit, from the token journal (broker/journal.py): a client whose
stream broke reconnects with its SSE Last-Event-ID, or retries its POST with the same Idempotency-Key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import structlog

from api.auth.metering import Reservation
from api.errors import ApiError
from broker.events import Event
from broker.journal import JournalFollower
from common.tasks import cancel_and_wait
from contracts import ChoiceDelta, EmbedRequest, End, ErrorCode, FinishReason, GenerateRequest, Tokens, Usage

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Timeouts:
    queue_s: float  # longest wait for a worker to accept
    silence_s: float  # longest gap between events once accepted (workers heartbeat every second)
    max_attempts: int = 3  # a request survives this many workers going silent under it, minus one


class GenerationState(Enum):
    QUEUED = "queued"  # this attempt's `accepted` event not seen yet: wait at most queue_s for each event
    QUEUED_ELSEWHERE = "queued_elsewhere"  # as QUEUED, but our resubmission was a duplicate of another edge's
    STREAMING = "streaming"  # a worker accepted this attempt: each event must follow within silence_s
    # The attempt will not finish this client's answer (an abort this edge did not ask for: another client of the
    # request left, a newer attempt superseded it, its worker stopped; or, following the journal, events of an
    # attempt another edge's client may still be reading were lost): wait for its end (or its silence), then
    # continue on a new attempt. Its other events are ignored.
    ABANDONED = "abandoned"
    FINISHED = "finished"  # ended or failed on the worker: nothing left to cancel


class GenerationPort(Protocol):
    """What a Generation needs of the engine client that started it, and nothing more."""

    @property
    def timeouts(self) -> Timeouts: ...

    async def publish(self, request: GenerateRequest | EmbedRequest) -> bool:
        """Queue a (re)submission of the request; False if the queue already had it (another edge's)."""

    async def still_queued(self, request: GenerateRequest | EmbedRequest) -> bool | None:
        """Whether this attempt (published through this port) is still in the queue; None when unknown."""

    async def cancel(self, request_id: str, attempt: int | None = None) -> None:
        """Stop the request on its worker (best effort)."""

    def release(self, request_id: str) -> None:
        """Stop routing the request's events to this generation."""


def timeout_error(timeouts: Timeouts, accepted: bool) -> ApiError:
    if accepted:
        return ApiError(ErrorCode.WORKER_LOST, "the worker serving this request stopped responding", retry_after=1.0)
    return ApiError(
        ErrorCode.NO_WORKER, f"no worker accepted the request within {timeouts.queue_s:g} s", retry_after=5.0
    )


class Generation:
    """One submitted request. Iterate it for Tokens events and the final End; failures raise ApiError.

    If the worker goes silent mid-stream, the request is resubmitted with the tokens already delivered
    (`resume_token_ids`, attempt + 1): the next worker continues from there, so the client sees one
    uninterrupted stream. Events of superseded attempts are ignored.

    A generation that follows the journal (`follower`) replays every attempt's events from the start: it moves
    on to a newer attempt when one appears, drops tokens it already has (an attempt's `accepted` event says
    where its tokens start), and continues a request its previous client cancelled, by resubmitting it."""

    def __init__(
        self,
        port: GenerationPort,
        request: GenerateRequest | EmbedRequest,
        events: asyncio.Queue[Event],
        reservation: Reservation | None = None,
        follower: JournalFollower | None = None,
        own_attempts: bool = False,
        stored: bool = False,
    ):
        self._port = port
        self.request = request
        self.state = GenerationState.QUEUED
        self._events = events
        self._follower = follower
        self._expected_seq = 0  # the current attempt's next event
        self._delivered: list[int] = list(getattr(request, "resume_token_ids", ()))
        self._position = len(self._delivered)  # where the current attempt's next token goes (followers)
        self._finish_delivered = False  # the answer's finish_reason went out (an abort never does: _without_abort)
        self._reservation = reservation  # the caller's tokens held for this generation, settled in close()
        self._usage: Usage | None = None
        self._queue_deadline = time.monotonic() + port.timeouts.queue_s  # while QUEUED: when to give up waiting
        self._left_queue_at: float | None = None  # while QUEUED: when the queue was first seen without it
        # True (a retried POST following the journal): the attempt limit counts the attempts this generation
        # queued, not the request's attempt number (see the module's docstring).
        self._own_attempts = own_attempts
        self._queued_here: set[int] = set()  # attempts this generation queued (not another edge's duplicate)
        # True: following a request whose events the journal held when it attached, so its replay comes at once;
        # cleared by the first event. Still set a silence timeout later: the journal cannot be read back.
        self._unheard_replay = stored
        # Its lines carry request_id and model, worker_id once accepted (trace_id comes from the HTTP request's
        # log context, api/request_context.py).
        self._log = log.bind(request_id=request.request_id, model=request.model)

    async def __aiter__(self) -> AsyncIterator[Tokens | End]:
        try:
            while self.state is not GenerationState.FINISHED:
                for event in await self._advance():
                    yield event
        finally:
            await self.close()

    async def _advance(self) -> Sequence[Tokens | End]:
        """Take the next event (or notice the worker is gone) and move the state; what to hand the client."""
        accepted = self.state in (GenerationState.STREAMING, GenerationState.ABANDONED)
        timeouts = self._port.timeouts
        if self.state is GenerationState.QUEUED:  # look at the queue every silence timeout while waiting
            wait = min(timeouts.silence_s, max(0.0, self._queue_deadline - time.monotonic()))
        else:
            wait = timeouts.silence_s if accepted else timeouts.queue_s
        try:
            event = await self._next_event(wait)
        except TimeoutError:
            if self.state is GenerationState.QUEUED and time.monotonic() < self._queue_deadline:
                return await self._check_queue()
            if not ((accepted or self.state is GenerationState.QUEUED_ELSEWHERE) and self._resumable):
                raise timeout_error(self._port.timeouts, accepted) from None
            # The worker went silent: continue elsewhere. Or the attempt another edge queued showed nothing here
            # for a whole queue timeout: it expired, or it ran while a NATS node failed and its events missed
            # the journal. Its duplicate would never run; take the next attempt.
            return await self._worker_lost()
        if event.attempt != self.request.attempt:
            if self._follower is None or event.attempt < self.request.attempt:
                return ()  # from a superseded attempt (a worker that was presumed dead)
            self._adopt(event.attempt)
        self._left_queue_at = None  # the current attempt spoke
        self._unheard_replay = False
        if self.state is GenerationState.ABANDONED:
            return await self._wait_out(event)
        if self._lost_before(event):
            return await self._after_gap(event)
        if event.kind == "error":
            self.state = GenerationState.FINISHED
            raise ApiError.from_info(event.error)
        self._expected_seq = event.seq + 1
        if event.kind == "accepted":
            self.state = GenerationState.STREAMING
            self._position = event.resumed_tokens
            self._log = self._log.bind(worker_id=event.worker_id)
            if self._follower is not None and event.resumed_tokens > len(self._delivered):
                # Resumed by another edge from tokens this client never got (the journal lost them): its tokens
                # cannot be placed, and superseding it would abort that edge's client.
                self._wait_for_end("another edge resumed it past the tokens delivered here")
        elif event.kind == "tokens":
            return self._deliver(event)
        elif event.kind == "embeddings":
            return (event,)
        elif event.kind == "end":
            self.state = GenerationState.FINISHED
            self._usage = event.usage
            return (event,)
        return ()  # accepted, heartbeat

    def _deliver(self, event: Tokens) -> Sequence[Tokens]:
        if self._follower is not None and (event := self._unseen(event)) is None:
            return ()
        if (event := self._without_abort(event)) is None:
            return ()
        self._delivered.extend(t for c in event.choices if c.index == 0 for t in c.token_ids)
        self._finish_delivered |= any(c.finish_reason is not None for c in event.choices if c.index == 0)
        return (event,)

    async def _check_queue(self) -> Sequence[Tokens | End]:
        """Queued and silent. A request that left the queue (a worker took it and acked it; the ack and its
        `accepted` event go out side by side, in either order) and still showed nothing a silence timeout later
        had its events lost (the edge's NATS node died with them, or the worker died right after taking it):
        continue on a new attempt rather than wait out the whole queue timeout (600 s for batch lines)."""
        if self._unheard_replay:
            return await self._replay_lost()
        if await self._port.still_queued(self.request) is not False:
            self._left_queue_at = None
            return ()
        now = time.monotonic()
        if self._left_queue_at is None or now - self._left_queue_at < self._port.timeouts.silence_s:
            self._left_queue_at = self._left_queue_at or now  # its `accepted` event may be on the way
            return ()
        self._log.warning("request.lost_after_leaving_the_queue", attempt=self.request.attempt)
        if not self._resumable:
            raise timeout_error(self._port.timeouts, accepted=True)
        return await self._worker_lost()

    async def _replay_lost(self) -> Sequence[Tokens | End]:
        """Following a request the journal held events of, and none came back within a silence timeout (its
        reader delivered nothing even from the stream's leader: broker/journal.py): continue on an attempt of its
        own from what was delivered (nothing), rather than wait out the queue timeout for events that will not come
        (chaos run, seed 2026, `keyed2.404.dup`): a retried POST, whose client holds none of the text. A
        Last-Event-ID resume holds text this edge never saw (an unseeded answer started again would not match it):
        a clear error."""
        self._unheard_replay = False  # once: the attempt it starts is watched like any other
        restart = self._own_attempts and self._resumable
        self._log.warning("request.journal_silent", attempt=self.request.attempt, restarted=restart)
        if not restart:
            self.state = GenerationState.FINISHED  # nothing of it runs for this client: nothing to cancel
            raise ApiError(
                ErrorCode.WORKER_LOST, "none of this request's token events could be read back", retry_after=1.0
            )
        return await self._worker_lost()

    async def _worker_lost(self) -> Sequence[Tokens | End]:
        """The worker went silent or events were lost: finish here if everything arrived, else continue on a new
        attempt."""
        if self._all_delivered or self._finish_delivered:
            self.state = GenerationState.FINISHED
            return self._synthetic_end()
        await self._resubmit()
        return ()

    def _adopt(self, attempt: int) -> None:
        """Follow a newer attempt seen in the journal (another edge resubmitted the request)."""
        self.request = self.request.model_copy(update={"attempt": attempt})
        if self.state is not GenerationState.QUEUED_ELSEWHERE:
            self._enter_queued()
        self._expected_seq = 0

    def _unseen(self, event: Tokens) -> Tokens | None:
        """A replayed event without what was already delivered: an attempt that resumed from fewer tokens than
        its predecessor streamed repeats those (identically, for greedy or seeded sampling)."""
        if self.request.sampling.num_candidates != 1:
            return event  # never resumed, so one attempt: nothing repeats
        choices = []
        for delta in event.choices:
            self._position += len(delta.token_ids)
            if delta.token_ids and self._position <= len(self._delivered):
                continue
            choices.append(delta)
        if not choices and event.prompt_logprobs is None:
            return None
        return event.model_copy(update={"choices": choices})

    def _without_abort(self, event: Tokens) -> Tokens | None:
        """An abort is never this client's answer: an edge cancels only when its client left, and then reads no
        more. So the worker stopped the attempt for someone else (another client of the same request left, a
        newer attempt superseded it, the worker shut down). Kept back: the request continues on a new attempt
        once this one ended; one that cannot be resumed is a clear error, never a silently truncated answer."""
        if not any(delta.finish_reason is FinishReason.ABORT for delta in event.choices):
            return event
        self._wait_for_end("aborted on its worker")
        choices = []
        for delta in event.choices:
            if delta.finish_reason is FinishReason.ABORT:
                delta = delta.model_copy(update={"finish_reason": None, "stop_reason": None})
                if not delta.token_ids and not delta.text:
                    continue
            choices.append(delta)
        if not choices and event.prompt_logprobs is None:
            return None
        return event.model_copy(update={"choices": choices})

    def _wait_for_end(self, why: str) -> None:
        """Leave the current attempt (ABANDONED); without an attempt left, a clear error instead."""
        self._log.warning("request.attempt_abandoned", attempt=self.request.attempt, why=why, resumed=self._resumable)
        if not self._resumable:
            self.state = GenerationState.FINISHED
            raise ApiError(
                ErrorCode.WORKER_LOST,
                f"this request cannot be completed: {why}, and it cannot be resumed again",
                retry_after=1.0,
            )
        self.state = GenerationState.ABANDONED

    async def _wait_out(self, event: Event) -> Sequence[Tokens | End]:
        """ABANDONED: of the attempt only its end matters (its silence is noticed in _advance)."""
        if event.kind == "error":
            self.state = GenerationState.FINISHED
            raise ApiError.from_info(event.error)
        if event.kind == "end":
            return await self._worker_lost()  # this client wants the rest
        return ()

    async def _after_gap(self, event: Event) -> Sequence[Tokens | End]:
        """Events of the current attempt were lost. Continue on a new attempt at once if it has ended or is this
        generation's own; a follower waits out another edge's attempt first: that edge's client may still be
        reading it (its own events reach it directly, not through the journal), and a new attempt would supersede
        it on the worker and hand that client an "abort" (chaos seed 2026, 30 minutes)."""
        if self._follower is None or event.kind == "end" or self.request.attempt in self._queued_here:
            return await self._worker_lost()
        self._wait_for_end(f"events lost ({self._expected_seq} to {event.seq - 1})")
        return ()

    def _lost_before(self, event: Event) -> bool:
        """Whether events were lost ahead of `event` (core NATS drops what arrives while a connection is being
        re-established). Tokens after a gap cannot be placed: a resumable request continues from what was
        delivered, on a new attempt. Only the `accepted` event (seq 0) missing loses nothing."""
        expected = self._expected_seq
        if event.kind == "accepted" or event.seq <= expected or (expected, event.seq) == (0, 1):
            return False
        self._log.warning("request.event_gap", expected=expected, got=event.seq, resumed=self._resumable)
        if not self._resumable:
            # Going on would hand the client an answer with a hole in it, as if it were whole.
            raise ApiError(
                ErrorCode.WORKER_LOST,
                "token events of this request were lost in transit and it cannot be resumed again",
                retry_after=1.0,
            )
        return True

    async def _next_event(self, timeout: float) -> Event:
        # Hot path: events usually wait already; asyncio.timeout() avoids wait_for's task per call.
        try:
            return self._events.get_nowait()
        except asyncio.QueueEmpty:
            async with asyncio.timeout(timeout):
                return await self._events.get()

    @property
    def _resumable(self) -> bool:
        spent = len(self._queued_here) if self._own_attempts else self.request.attempt - 1
        if spent >= self._port.timeouts.max_attempts - 1:
            return False
        return isinstance(self.request, EmbedRequest) or self.request.sampling.num_candidates == 1

    @property
    def _all_delivered(self) -> bool:
        limit = self.request.sampling.max_tokens
        return limit is not None and len(self._delivered) >= limit

    def _synthetic_end(self) -> list[Tokens | End]:
        """Every token arrived but the worker died before saying so (or its `end` was lost: from the journal, a
        finished request whose `end` a node fault dropped): finish the stream here. Resuming after a stop would
        have a worker generate past it."""
        usage = Usage(prompt_tokens=prompt_tokens(self.request), completion_tokens=len(self._delivered))
        common = {"request_id": self.request.request_id, "attempt": self.request.attempt}
        end = End(**common, seq=1, usage=usage)
        if self._finish_delivered:
            return [end]
        return [Tokens(**common, seq=0, choices=[ChoiceDelta(index=0, finish_reason=FinishReason.LENGTH)]), end]

    async def _resubmit(self) -> None:
        previous = self.request
        update = {"attempt": previous.attempt + 1, "deadline": time.time() + self._port.timeouts.queue_s}
        if isinstance(previous, GenerateRequest):
            update["resume_token_ids"] = list(self._delivered)
        self.request = previous.model_copy(update=update)
        self._expected_seq = 0
        self._log.warning("request.resubmitted", attempt=self.request.attempt, delivered=len(self._delivered))
        # False: another edge queued this attempt already (both saw the worker fall silent); follow it.
        queued = await self._port.publish(self.request)
        if queued:
            self._queued_here.add(self.request.attempt)
            self._enter_queued()
        else:
            self.state = GenerationState.QUEUED_ELSEWHERE

    def _enter_queued(self) -> None:
        self.state = GenerationState.QUEUED
        self._queue_deadline = time.monotonic() + self._port.timeouts.queue_s
        self._left_queue_at = None

    async def close(self) -> None:
        """Stop listening; if the generation has not finished, cancel its attempt on the worker."""
        if self._follower is not None:
            await asyncio.shield(self._follower.close())
        self._port.release(self.request.request_id)
        left, self.state = self.state, GenerationState.FINISHED
        # An abandoned attempt is not this client's to stop: aborted already, or another edge's client reads it.
        if left not in (GenerationState.FINISHED, GenerationState.ABANDONED):
            await asyncio.shield(self._port.cancel(self.request.request_id, self.request.attempt))
        if self._reservation is not None:
            # What the worker reported, else what we know it spent (the prompt and the tokens delivered).
            used = self._usage or Usage(
                prompt_tokens=prompt_tokens(self.request), completion_tokens=len(self._delivered)
            )
            reservation, self._reservation = self._reservation, None
            await asyncio.shield(reservation.settle(used.prompt_tokens + used.completion_tokens))


def prompt_tokens(request: GenerateRequest | EmbedRequest) -> int:
    if isinstance(request, EmbedRequest):
        return sum(len(tokens) for tokens in request.inputs)
    return len(request.prompt_token_ids)


async def merge(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Tokens | End]]:
    """Interleave several generations' events as they arrive, tagged with the generation's position."""
    if len(generations) == 1:
        async for event in generations[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Tokens | End | BaseException | None]] = asyncio.Queue()

    async def forward(position: int, generation: Generation) -> None:
        try:
            async for event in generation:
                await queue.put((position, event))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((position, exc))
        else:
            await queue.put((position, None))

    tasks = [asyncio.create_task(forward(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        await cancel_and_wait(*tasks)
        for generation in generations:
            await generation.close()
