"""The engine client over NATS: submits a request to its model's JetStream work queue and routes the request's
events (core NATS, `inf.tok.<edge>.<request>`) to its Generation; follows requests other edges submitted from the
token journal. Routes and serving code depend on the `EngineClient` protocol (api/engine_client.py), not on this."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import structlog
from nats.aio.client import Client as NatsClient

from api.affinity import AffinityRouter
from api.auth.caller import ANONYMOUS
from api.auth.metering import Meter, reserve_for
from api.auth.request_ids import unknown_request
from api.errors import ApiError, broker_error
from api.generation import Generation, Timeouts
from broker.errors import BrokerError, QueueFull
from broker.events import EventRouter, publish_cancel
from broker.journal import JournalFollower, journal_has
from broker.tracing import trace_headers
from broker.work_queue import DrainGauge, Lane, Queued, enqueue_request, still_queued
from contracts import GenerateRequest
from contracts.requests import BATCH_PRIORITY

log = structlog.get_logger(__name__)


class NatsEngineClient:
    """Submits to a model's queue. `lane=Lane.BATCH` is for background work (the batch runner): its requests go
    to the lane workers pull only when no interactive request waits, at a lower priority inside the worker."""

    def __init__(
        self,
        nc: NatsClient,
        router: EventRouter,
        timeouts: Timeouts,
        lane: Lane = Lane.INTERACTIVE,
        drain: DrainGauge | None = None,
        affinity: AffinityRouter | None = None,
    ):
        self._nc = nc
        self._js = nc.jetstream()
        self._drain = drain or DrainGauge(self._js)  # shared by all variants: its samples span requests
        self._router = router
        self.timeouts = timeouts  # also read by its generations (GenerationPort)
        self._lane = lane
        self._affinity = affinity  # None: every request goes to the shared subject
        self._affinity_key: str | None = None  # the client's routing key (else the prompt's leading tokens)
        self._meter: Meter | None = None  # whose token budget submissions reserve from (None: nobody's)
        self._idempotency_key: str | None = None
        self._message_keys: dict[str, str] = {}  # request id -> its dedup key (several requests share a client)
        self._queued: dict[str, tuple[int, Queued]] = {}  # request id -> (attempt, where that publish went)

    def charging(self, meter: Meter | None) -> NatsEngineClient:
        """A client whose submissions reserve their tokens from `meter` (the caller's budget)."""
        return self._variant(_meter=meter)

    def keyed(self, idempotency_key: str) -> NatsEngineClient:
        """A client whose submissions are deduplicated under `idempotency_key` (`key`, `key/1`, … for several
        requests) instead of their request ids: a repeated submission of the same work is queued once."""
        return self._variant(_idempotency_key=idempotency_key)

    def routed_by(self, key: str | None) -> NatsEngineClient:
        """A client whose submissions are routed by `key` (api/affinity.py) instead of their prompt's tokens."""
        return self._variant(_affinity_key=key)

    def in_lane(self, lane: Lane, timeouts: Timeouts) -> NatsEngineClient:
        """A client for another lane (the batch runner's), sharing this one's connection and event router."""
        return self._variant(_lane=lane, timeouts=timeouts)

    def _variant(self, **changes: object) -> NatsEngineClient:
        variant = copy.copy(self)
        for name, value in changes.items():
            setattr(variant, name, value)
        variant._message_keys = {}
        variant._queued = {}
        return variant

    def _message_key(self, request: GenerateRequest) -> str | None:
        if self._idempotency_key is None:
            return None
        if request.request_id not in self._message_keys:
            count = len(self._message_keys)
            self._message_keys[request.request_id] = (
                f"{self._idempotency_key}/{count}" if count else self._idempotency_key
            )
        return self._message_keys[request.request_id]

    def reply_subject(self, request_id: str) -> str:
        """Interactive replies are journaled (replayable by another edge); batch lines are not."""
        return self._router.reply_subject(request_id, journaled=self._lane is Lane.INTERACTIVE)

    async def submit(self, request: GenerateRequest, *, attach_duplicate: bool = False) -> Generation:
        """Queue the request durably; raises ApiError (429 full or over the caller's token budget, 503
        unavailable, 413 too large) at once. `attach_duplicate`: if the queue already had this request id, follow
        that submission instead (see submit_or_attach)."""
        if self._lane is Lane.BATCH:
            request = request.model_copy(update={"priority": max(request.priority, BATCH_PRIORITY)})
        reservation = await reserve_for(request, self._meter)
        events = self._router.open(request.request_id)
        try:
            queued = await self.publish(request)
        except ApiError:
            self.release(request.request_id)
            await reservation.settle(0)
            raise
        if queued or not attach_duplicate:
            return Generation(self, request, events, reservation)
        self.release(request.request_id)  # the first submission's events go to its own edge
        await reservation.settle(0)
        return await self.attach(request, retried=True)

    async def submit_or_attach(self, request: GenerateRequest) -> Generation:
        """Submit a request whose id the client chose (Idempotency-Key, X-Request-Id); if that request was
        already submitted (its events are in the journal, or the queue holds it), follow it instead."""
        if await self._journal_has(request.request_id):
            return await self.attach(request, retried=True, stored=True)
        return await self.submit(request, attach_duplicate=True)

    async def resume(self, request: GenerateRequest) -> Generation:
        """Follow a request submitted earlier (by this edge or another), from the journal; 404 if the journal
        no longer has it. Whether the caller may follow it is decided before (api/auth/request_ids.owns)."""
        if not await self._journal_has(request.request_id):
            raise unknown_request(request.request_id)
        return await self.attach(request, stored=True)

    async def attach(self, request: GenerateRequest, *, retried: bool = False, stored: bool = False) -> Generation:
        """Follow the request from the journal. `retried`: a new POST of it (the client holds none of its text),
        which may start attempts of its own where the journal's last attempt cannot be continued (lost events, a
        silent worker), even past the attempts the request already used; a Last-Event-ID resume may not.
        `stored`: the journal holds events of it (else it may still wait in the queue, unheard of)."""
        try:
            # Its reader reads the journal directly whenever it has been quiet for half a silence timeout (longer
            # than a running request's heartbeat interval), so that a consumer delivering nothing is read around
            # before the request is taken for silent.
            reader = JournalFollower(self._js, request.request_id, catch_up_after_s=self.timeouts.silence_s / 2)
            follower = await reader.start()
        except BrokerError as exc:
            raise broker_error(exc) from exc
        log.info("request.attached", request_id=request.request_id)
        return Generation(self, request, follower.events, follower=follower, own_attempts=retried, stored=stored)

    async def _journal_has(self, request_id: str) -> bool:
        try:
            return await journal_has(self._js, request_id)
        except BrokerError as exc:
            raise broker_error(exc) from exc

    async def publish(self, request: GenerateRequest) -> bool:
        """Queue the request; False if the queue already had it (a duplicate of the same submission)."""
        try:
            # The current span (the HTTP request's) travels in the headers: the worker's spans join its trace.
            queued = await enqueue_request(
                self._js,
                request,
                idempotency_key=self._message_key(request),
                lane=self._lane,
                headers=trace_headers(),
                subject=await self._affine_subject(request),
            )
        except QueueFull as exc:
            raise broker_error(exc, retry_after=await self._drain_time(request.model)) from exc
        except BrokerError as exc:
            raise broker_error(exc) from exc
        self._queued[request.request_id] = (request.attempt, queued)
        return not queued.duplicate

    async def still_queued(self, request: GenerateRequest) -> bool | None:
        """Whether this attempt's message is still in the queue; None when unknown (not published here)."""
        published = self._queued.get(request.request_id)
        if published is None or published[0] != request.attempt:
            return None
        return await still_queued(self._js, published[1])

    async def _affine_subject(self, request: GenerateRequest) -> str | None:
        """A first attempt of an interactive generation may go to a worker's own subject. A resubmission goes to
        the shared one: its worker went silent, and any live worker continues from the tokens delivered."""
        if (
            self._affinity is None
            or self._lane is not Lane.INTERACTIVE
            or not isinstance(request, GenerateRequest)
            or request.attempt != 1
        ):
            return None
        owner = self._meter.owner if self._meter is not None else ANONYMOUS.owner
        return await self._affinity.subject_for(request, owner, self._affinity_key)

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

    def release(self, request_id: str) -> None:
        self._router.close(request_id)
        self._queued.pop(request_id, None)
