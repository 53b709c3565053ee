"""The edge's view of the engines: submit a request to the model's queue, then iterate its events. Owns the
request's state machine: queued (bounded wait) → streaming (bounded silence) → end | error. Closing the
iteration early (client gone) cancels the generation on the worker.

An edge can also follow a request it did not submit, from the token journal (broker/journal.py): a client whose
stream broke reconnects with its SSE Last-Event-ID, or retries its POST with the same Idempotency-Key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient

from api.auth.metering import Reservation, reserve_for
from api.auth.request_ids import unknown_request
from api.errors import ApiError, broker_error
from broker.errors import BrokerError, QueueFull
from broker.events import Event, EventRouter, publish_cancel
from broker.journal import JournalFollower, journal_has
from broker.tracing import trace_headers
from broker.work_queue import DrainGauge, Lane, publish_request
from contracts import ChoiceDelta, EmbedRequest, End, ErrorCode, FinishReason, GenerateRequest, Tokens, Usage
from contracts.requests import BATCH_PRIORITY

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Timeouts:
    queue_s: float  # longest wait for a worker to accept
    silence_s: float  # longest gap between events once accepted (workers heartbeat every second)
    max_attempts: int = 3  # a request survives this many workers going silent under it, minus one


class Generation:
    """One submitted request. Iterate it for Tokens events and the final End; failures raise ApiError.

    If the worker goes silent mid-stream, the request is resubmitted with the tokens already delivered
    (`resume_token_ids`, attempt + 1): the next worker continues from there, so the client sees one
    uninterrupted stream. Events of superseded attempts are ignored.

    A generation that follows the journal (`follower`) replays every attempt's events from the start: it moves
    on to a newer attempt when one appears, drops tokens it already has (an attempt's `accepted` event says
    where its tokens start), and continues a request its previous client cancelled, by resubmitting it."""

    def __init__(self, client: EngineClient, request: GenerateRequest, events: asyncio.Queue[Event],
                 reservation: Reservation | None = None, follower: JournalFollower | None = None):
        self._client = client
        self.request = request
        self._events = events
        self._follower = follower
        self._delivered: list[int] = list(getattr(request, "resume_token_ids", ()))
        self._position = len(self._delivered)  # where the current attempt's next token goes (followers)
        self._aborted = False  # a follower saw the request cancelled under its previous client
        self._queued_elsewhere = False  # our resubmission was a duplicate of another edge's
        self._done = False
        self._reservation = reservation  # the caller's tokens held for this generation, settled in close()
        self._usage: Usage | None = None
        # Its lines carry request_id and model, worker_id once accepted (trace_id comes from the HTTP request's
        # log context, api/request_context.py).
        self._log = log.bind(request_id=request.request_id, model=request.model)

    async def __aiter__(self) -> AsyncIterator[Tokens | End]:
        accepted = False
        expected_seq = 0
        try:
            while True:
                timeout = self._client.timeouts.silence_s if accepted else self._client.timeouts.queue_s
                try:
                    event = await self._next_event(timeout)
                except TimeoutError:
                    if not ((accepted or self._queued_elsewhere) and self._resumable):
                        raise self._client.timeout_error(accepted) from None
                    # The worker went silent: continue elsewhere. Or the attempt another edge queued showed
                    # nothing here for a whole queue timeout: it expired, or it ran while a NATS node failed
                    # and its events missed the journal. Its duplicate would never run; take the next attempt.
                    event = None
                if event is not None and event.attempt != self.request.attempt:
                    if self._follower is None or event.attempt < self.request.attempt:
                        continue  # from a superseded attempt (a worker that was presumed dead)
                    self._adopt(event.attempt)
                    accepted, expected_seq = False, 0
                if event is None or self._lost_before(event, expected_seq):
                    if self._all_delivered:
                        self._done = True
                        for event in self._synthetic_end():
                            yield event
                        return
                    await self._resubmit()
                    accepted, expected_seq = False, 0
                    continue
                if event.kind == "error":
                    self._done = True
                    raise ApiError.from_info(event.error)
                expected_seq = event.seq + 1
                if event.kind == "accepted":
                    accepted, self._queued_elsewhere = True, False
                    self._position = event.resumed_tokens
                    self._log = self._log.bind(worker_id=event.worker_id)
                elif event.kind == "tokens":
                    if self._follower is not None and (event := self._unseen(event)) is None:
                        continue
                    self._delivered.extend(t for c in event.choices if c.index == 0 for t in c.token_ids)
                    yield event
                elif event.kind == "embeddings":
                    yield event
                elif event.kind == "end" and self._aborted:
                    await self._resubmit()  # its previous client left; this one wants the rest
                    accepted, expected_seq, self._aborted = False, 0, False
                elif event.kind == "end":
                    self._done = True
                    self._usage = event.usage
                    yield event
                    return
        finally:
            await self.close()

    def _adopt(self, attempt: int) -> None:
        """Follow a newer attempt seen in the journal (another edge resubmitted the request)."""
        self.request = self.request.model_copy(update={"attempt": attempt})
        self._aborted = False

    def _unseen(self, event: Tokens) -> Tokens | None:
        """A replayed event without what was already delivered: an attempt that resumed from fewer tokens than
        its predecessor streamed repeats those (identically, for greedy or seeded sampling). An abort from the
        previous client leaving is kept back: this client still wants the rest."""
        if self.request.sampling.num_candidates != 1:
            return event  # never resumed, so one attempt: nothing repeats
        choices = []
        for delta in event.choices:
            self._position += len(delta.token_ids)
            if delta.token_ids and self._position <= len(self._delivered):
                continue
            if delta.finish_reason is FinishReason.ABORT and self._resumable:
                self._aborted = True
                delta = delta.model_copy(update={"finish_reason": None, "stop_reason": None})
                if not delta.token_ids and not delta.text:
                    continue
            choices.append(delta)
        if not choices and event.prompt_logprobs is None:
            return None
        return event.model_copy(update={"choices": choices})

    def _lost_before(self, event: Event, expected_seq: int) -> bool:
        """Whether events were lost ahead of `event` (core NATS drops what arrives while a connection is being
        re-established). Tokens after a gap cannot be placed: a resumable request continues from what was
        delivered, on a new attempt. Only the `accepted` event (seq 0) missing loses nothing."""
        if event.kind == "accepted" or event.seq <= expected_seq or (expected_seq, event.seq) == (0, 1):
            return False
        self._log.warning("request.event_gap", expected=expected_seq, got=event.seq, resumed=self._resumable)
        if not self._resumable:
            # Going on would hand the client an answer with a hole in it, as if it were whole.
            raise ApiError(ErrorCode.WORKER_LOST, "token events of this request were lost in transit and it cannot "
                           "be resumed again", retry_after=1.0)
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
        if self.request.attempt >= self._client.timeouts.max_attempts:
            return False
        return isinstance(self.request, EmbedRequest) or self.request.sampling.num_candidates == 1

    @property
    def _all_delivered(self) -> bool:
        limit = self.request.sampling.max_tokens
        return limit is not None and len(self._delivered) >= limit

    def _synthetic_end(self) -> list[Tokens | End]:
        """Every token arrived but the worker died before saying so: finish the stream here."""
        usage = Usage(prompt_tokens=prompt_tokens(self.request), completion_tokens=len(self._delivered))
        common = {"request_id": self.request.request_id, "attempt": self.request.attempt}
        return [Tokens(**common, seq=0, choices=[ChoiceDelta(index=0, finish_reason=FinishReason.LENGTH)]),
                End(**common, seq=1, usage=usage)]

    async def _resubmit(self) -> None:
        previous = self.request
        update = {"attempt": previous.attempt + 1, "deadline": time.time() + self._client.timeouts.queue_s}
        if isinstance(previous, GenerateRequest):
            update["resume_token_ids"] = list(self._delivered)
        self.request = previous.model_copy(update=update)
        self._log.warning("request.resubmitted", attempt=self.request.attempt, delivered=len(self._delivered))
        # False: another edge queued this attempt already (both saw the worker fall silent); follow it.
        self._queued_elsewhere = not await self._client.publish(self.request)

    async def close(self) -> None:
        """Stop listening; if the generation has not finished, cancel it on the worker."""
        if self._follower is not None:
            await asyncio.shield(self._follower.close())
        self._client.router.close(self.request.request_id)
        if not self._done:
            self._done = True
            await asyncio.shield(self._client.cancel(self.request.request_id, self.request.attempt))
        if self._reservation is not None:
            # What the worker reported, else what we know it spent (the prompt and the tokens delivered).
            used = self._usage or Usage(prompt_tokens=prompt_tokens(self.request),
                                        completion_tokens=len(self._delivered))
            reservation, self._reservation = self._reservation, None
            await asyncio.shield(reservation.settle(used.prompt_tokens + used.completion_tokens))


def prompt_tokens(request: GenerateRequest | EmbedRequest) -> int:
    if isinstance(request, EmbedRequest):
        return sum(len(tokens) for tokens in request.inputs)
    return len(request.prompt_token_ids)


class EngineClient:
    """Submits to a model's queue. `lane=Lane.BATCH` is for background work (the batch runner): its requests go
    to the lane workers pull only when no interactive request waits, at a lower priority inside the worker."""

    def __init__(self, nc: NatsClient, router: EventRouter, timeouts: Timeouts, lane: Lane = Lane.INTERACTIVE,
                 idempotency_key: str | None = None, drain: DrainGauge | None = None):
        self._nc = nc
        self._js = nc.jetstream()
        self._drain = drain or DrainGauge(self._js)  # shared by keyed copies: its samples span requests
        self.router = router
        self.timeouts = timeouts
        self.lane = lane
        self._idempotency_key = idempotency_key
        self._message_keys: dict[str, str] = {}  # request id -> its dedup key (several requests share a client)

    def keyed(self, idempotency_key: str) -> EngineClient:
        """A client whose submissions are deduplicated under `idempotency_key` (`key`, `key/1`, … for several
        requests) instead of their request ids: a repeated submission of the same work is queued once."""
        return EngineClient(self._nc, self.router, self.timeouts, self.lane, idempotency_key, self._drain)

    def _message_key(self, request: GenerateRequest) -> str | None:
        if self._idempotency_key is None:
            return None
        if request.request_id not in self._message_keys:
            count = len(self._message_keys)
            self._message_keys[request.request_id] = (f"{self._idempotency_key}/{count}" if count
                                                      else self._idempotency_key)
        return self._message_keys[request.request_id]

    def reply_subject(self, request_id: str) -> str:
        """Interactive replies are journaled (replayable by another edge); batch lines are not."""
        return self.router.reply_subject(request_id, journaled=self.lane is Lane.INTERACTIVE)

    async def submit(self, request: GenerateRequest, *, attach_duplicate: bool = False) -> Generation:
        """Queue the request durably; raises ApiError (429 full or over the caller's token budget, 503
        unavailable, 413 too large) at once. `attach_duplicate`: if the queue already had this request id, follow
        that submission instead (see submit_or_attach)."""
        if self.lane is Lane.BATCH:
            request = request.model_copy(update={"priority": max(request.priority, BATCH_PRIORITY)})
        reservation = await reserve_for(request)
        events = self.router.open(request.request_id)
        try:
            queued = await self.publish(request)
        except ApiError:
            self.router.close(request.request_id)
            await reservation.settle(0)
            raise
        if queued or not attach_duplicate:
            return Generation(self, request, events, reservation)
        self.router.close(request.request_id)  # the first submission's events go to its own edge
        await reservation.settle(0)
        return await self.attach(request)

    async def submit_or_attach(self, request: GenerateRequest) -> Generation:
        """Submit a request whose id the client chose (Idempotency-Key, X-Request-Id); if that request was
        already submitted (its events are in the journal, or the queue holds it), follow it instead."""
        if await self._journal_has(request.request_id):
            return await self.attach(request)
        return await self.submit(request, attach_duplicate=True)

    async def resume(self, request: GenerateRequest) -> Generation:
        """Follow a request submitted earlier (by this edge or another), from the journal; 404 if the journal
        no longer has it. Whether the caller may follow it is decided before (api/auth/request_ids.owns)."""
        if not await self._journal_has(request.request_id):
            raise unknown_request(request.request_id)
        return await self.attach(request)

    async def attach(self, request: GenerateRequest) -> Generation:
        try:
            follower = await JournalFollower(self._js, request.request_id).start()
        except BrokerError as exc:
            raise broker_error(exc) from exc
        log.info("request.attached", request_id=request.request_id)
        return Generation(self, request, follower.events, follower=follower)

    async def _journal_has(self, request_id: str) -> bool:
        try:
            return await journal_has(self._js, request_id)
        except BrokerError as exc:
            raise broker_error(exc) from exc

    async def publish(self, request: GenerateRequest) -> bool:
        """Queue the request; False if the queue already had it (a duplicate of the same submission)."""
        try:
            # The current span (the HTTP request's) travels in the headers: the worker's spans join its trace.
            return await publish_request(self._js, request, idempotency_key=self._message_key(request),
                                         lane=self.lane, headers=trace_headers())
        except QueueFull as exc:
            raise broker_error(exc, retry_after=await self._drain_time(request.model)) from exc
        except BrokerError as exc:
            raise broker_error(exc) from exc

    async def _drain_time(self, model: str) -> float | None:
        try:
            return await self._drain.retry_after(model)
        except Exception as exc:  # only the Retry-After hint is lost
            log.warning("queue.drain_estimate_failed", model=model, error=str(exc))
            return None

    async def submit_all(self, requests: Sequence[GenerateRequest], *, attach: bool = False) -> list[Generation]:
        """`attach`: the ids are the client's (see submit_or_attach)."""
        generations: list[Generation] = []
        try:
            for request in requests:
                generations.append(await (self.submit_or_attach(request) if attach else self.submit(request)))
        except ApiError:
            for generation in generations:
                await generation.close()
            raise
        return generations

    async def cancel(self, request_id: str, attempt: int | None = None) -> None:
        try:
            await publish_cancel(self._nc, request_id, up_to_attempt=attempt)
        except Exception as exc:  # best effort: a cancel lost in a reconnect only costs compute
            log.warning("request.cancel_failed", request_id=request_id, error=str(exc))

    def timeout_error(self, accepted: bool) -> ApiError:
        if accepted:
            return ApiError(ErrorCode.WORKER_LOST, "the worker serving this request stopped responding",
                            retry_after=1.0)
        return ApiError(ErrorCode.NO_WORKER, f"no worker accepted the request within {self.timeouts.queue_s:g} s",
                        retry_after=5.0)


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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for generation in generations:
            await generation.close()
