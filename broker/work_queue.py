"""Requests in and out of a model's work queue: the edge's `publish_request` and the worker's `RequestIntake`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from pydantic import ValidationError

from broker import subjects
from broker.errors import BrokerUnavailable, MessageTooLarge, QueueFull, QueueMissing
from contracts import EmbedRequest, GenerateRequest, parse_work_request

log = structlog.get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
_ERR_QUEUE_FULL = 10077
_ERR_MESSAGE_TOO_LARGE = 10054
PUBLISH_RETRY_S = 15.0  # a replicated stream elects a new leader within seconds of losing one
_FIRST_RETRY_DELAY_S = 0.1
_MAX_RETRY_DELAY_S = 1.0
_DRAIN_WINDOW_S = 30.0  # the rate a full queue drains at is measured over at most this long
_MIN_DRAIN_SAMPLE_S = 1.0
_UNKNOWN_DRAIN_RETRY_S = 2.0
_MAX_RETRY_AFTER_S = 60.0
# While batch work flows the worker polls both lanes briefly in turn; when the lane is idle it long-polls the
# interactive queue only, so a batch line waits at most one fetch timeout to be noticed.
_LANE_PROBE_S = 0.01
_BATCH_ACTIVE_S = 1.0
# With affinity the worker's own subject is probed first, and the shared queue is long-polled in slices this short,
# so a request published to the worker's own subject while it idles waits at most about this long (a pending pull
# cannot be taken back, so two queues cannot both be long-polled within one slot budget).
_AFFINE_SLICE_S = 0.1
# A consumer election answers 503 for seconds; a pull that fails for longer than this re-binds its subscription
# (a new inbox and pull request path) instead of repeating the same failing pull forever.
_REBIND_AFTER_S = 10.0


class Lane(StrEnum):
    """Which queue of a model a request goes to. Workers pull the batch lane only when the interactive one has
    nothing waiting, so background work never delays an interactive request in the queue."""

    INTERACTIVE = "interactive"
    BATCH = "batch"

    def subject(self, model_id: str) -> str:
        return subjects.batch_subject(model_id) if self is Lane.BATCH else subjects.request_subject(model_id)

    def stream(self, model_id: str) -> str:
        return subjects.batch_stream(model_id) if self is Lane.BATCH else subjects.request_stream(model_id)


def message_id(request: GenerateRequest | EmbedRequest, idempotency_key: str | None = None) -> str:
    """Dedup id: a retried publish of the same attempt is a no-op; a resubmission (attempt+1) is new work."""
    base = idempotency_key or request.request_id
    return base if request.attempt == 1 else f"{base}.r{request.attempt}"


async def publish_request(
    js: JetStreamContext,
    request: GenerateRequest | EmbedRequest,
    *,
    idempotency_key: str | None = None,
    timeout: float = 2.0,
    lane: Lane = Lane.INTERACTIVE,
    headers: Mapping[str, str] | None = None,
    retry_for_s: float = PUBLISH_RETRY_S,
    subject: str | None = None,
) -> bool:
    """Queue the request durably. Returns False when it was a duplicate of one already queued. `headers` go
    along with the message (the trace context, see broker/tracing.py). `subject`: a worker's own subject
    (subjects.affine_subject) instead of the lane's shared one; the same stream holds both, so the queue cap and
    the deduplication are the same.

    A publish that fails for a passing reason (no answer in time, the stream's leader being re-elected, NATS
    reconnecting) is retried for up to `retry_for_s` with the same `Nats-Msg-Id`: if the lost attempt was in
    fact stored, the retry is acknowledged as a duplicate, so the request is queued exactly once."""
    headers = {**(headers or {}), MSG_ID_HEADER: message_id(request, idempotency_key)}
    deadline = time.monotonic() + retry_for_s
    delay = _FIRST_RETRY_DELAY_S
    while True:
        try:
            ack = await js.publish(
                subject or lane.subject(request.model), request.to_bytes(), timeout=timeout, headers=headers
            )
            return not ack.duplicate
        except Exception as exc:
            error = _publish_error(exc, request.model)
            if not isinstance(error, _Passing) or time.monotonic() + delay > deadline:
                log.warning("publish.failed", request_id=request.request_id, error=repr(exc))
                raise error.final() if isinstance(error, _Passing) else error from exc
            log.warning("publish.retrying", request_id=request.request_id, error=str(exc), delay_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _MAX_RETRY_DELAY_S)


class _Passing(Exception):
    """A failure worth retrying; `final()` is what the caller sees once the retry budget is spent."""

    def __init__(self, final: Exception):
        super().__init__(str(final))
        self._final = final

    def final(self) -> Exception:
        return self._final


def _publish_error(exc: Exception, model: str) -> Exception:
    """Our exception for a failed publish: a `_Passing` wrapper when trying again may well succeed."""
    if isinstance(exc, jse.ServiceUnavailableError):
        if exc.err_code == _ERR_QUEUE_FULL:
            return QueueFull(model)
        return _Passing(BrokerUnavailable(str(exc)))  # e.g. the stream has no leader right now
    if isinstance(exc, jse.BadRequestError) and exc.err_code == _ERR_MESSAGE_TOO_LARGE:
        return MessageTooLarge(str(exc))
    if isinstance(exc, jse.BadRequestError):
        return BrokerUnavailable(str(exc))
    if isinstance(exc, nats.errors.MaxPayloadError):
        return MessageTooLarge(str(exc))
    if isinstance(exc, jse.NoStreamResponseError):
        # No stream answered: none exists for the model, or its leader is being re-elected.
        return _Passing(QueueMissing(f"no queue exists for model {model!r}"))
    if isinstance(
        exc,
        TimeoutError
        | nats.errors.ConnectionClosedError
        | nats.errors.OutboundBufferLimitError
        | nats.errors.ConnectionReconnectingError,
    ):
        return _Passing(BrokerUnavailable("NATS did not accept the request in time"))
    raise exc


class DrainGauge:
    """How long a full queue needs to make room: its depth over the rate workers have been taking requests off
    it lately (deliveries counted by the shared consumer, so every replica sees the whole fleet's rate)."""

    def __init__(self, js: JetStreamContext, clock: Callable[[], float] = time.monotonic):
        self._js = js
        self._clock = clock
        self._since: dict[str, tuple[float, int]] = {}  # model → (when, deliveries then): the start of the window

    async def retry_after(self, model_id: str) -> float:
        info = await self._js.consumer_info(subjects.request_stream(model_id), subjects.REQUEST_CONSUMER)
        now, taken = self._clock(), info.delivered.consumer_seq
        since = self._since.get(model_id)
        if since is None or now - since[0] > _DRAIN_WINDOW_S:
            self._since[model_id] = since = (now, taken)  # too old to say much about the rate now: start over
        elapsed = now - since[0]
        if elapsed < _MIN_DRAIN_SAMPLE_S:
            return _UNKNOWN_DRAIN_RETRY_S
        rate = (taken - since[1]) / elapsed
        if rate <= 0:
            return _MAX_RETRY_AFTER_S  # nothing is leaving the queue: no worker is taking work
        return min(_MAX_RETRY_AFTER_S, max(1.0, info.num_pending / rate))


async def queue_depth(js: JetStreamContext, model_id: str) -> int:
    """Requests waiting in the model's queue (not yet handed to a worker)."""
    info = await js.consumer_info(subjects.request_stream(model_id), subjects.REQUEST_CONSUMER)
    return info.num_pending


@dataclass(slots=True)
class Delivery:
    """One pulled request and the message it came in, so the worker can decide its fate explicitly."""

    request: GenerateRequest | EmbedRequest
    msg: Msg

    @property
    def attempt(self) -> int:
        return self.msg.metadata.num_delivered

    @property
    def headers(self) -> dict[str, str]:
        return self.msg.headers or {}

    @property
    def published_at(self) -> float:
        """Unix time the request entered the queue (the stream's timestamp, on the NATS server's clock)."""
        return self.msg.metadata.timestamp.timestamp()


class RequestIntake:
    """The worker's side of the queues: pull only as many requests as there are free slots, interactive ones
    first; the batch lane only when the interactive queue has nothing waiting. With affinity (`own_consumer`, see
    topology.ensure_affine_consumer), requests on the worker's own subject come before the shared queue, and so do
    those left on the subjects of dead workers this worker took over (`adopt`)."""

    def __init__(self, js: JetStreamContext, model_id: str, own_consumer: str | None = None):
        self._js = js
        self._model_id = model_id
        self._own_consumer = own_consumer
        self._subs: dict[Lane, JetStreamContext.PullSubscription] = {}
        self._affine: dict[str, JetStreamContext.PullSubscription] = {}  # consumer → subscription: own, adopted
        self._failing_since: dict[Lane, float] = {}  # lane → when its pulls began to fail
        self._batch_active_until = 0.0

    async def start(self) -> None:
        for lane in Lane:
            self._subs[lane] = await self._bind(lane)
        if self._own_consumer is not None:
            self._affine[self._own_consumer] = await self._bind_affine(self._own_consumer)

    async def _bind_affine(self, consumer: str) -> JetStreamContext.PullSubscription:
        return await self._js.pull_subscribe_bind(consumer, stream=subjects.request_stream(self._model_id))

    @property
    def adopted(self) -> set[str]:
        return set(self._affine) - {self._own_consumer}

    async def adopt(self, consumers: set[str]) -> None:
        """Pull these consumers too (the own subjects of dead workers that still hold requests), and no longer
        those that are not listed (drained). Several workers may pull one at once: each request goes to one."""
        for consumer in consumers - set(self._affine):
            self._affine[consumer] = await self._bind_affine(consumer)
            log.info("intake.adopted", consumer=consumer)
        for consumer in self.adopted - consumers:
            sub = self._affine.pop(consumer)
            log.info("intake.released", consumer=consumer)
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.warning("intake.unsubscribe_failed", consumer=consumer, error=repr(exc))

    async def _bind(self, lane: Lane) -> JetStreamContext.PullSubscription:
        return await self._js.pull_subscribe_bind(subjects.REQUEST_CONSUMER, stream=lane.stream(self._model_id))

    async def fetch(self, max_requests: int, timeout: float = 1.0) -> list[Delivery]:
        """Up to `max_requests`; returns as soon as any arrive, or empty after about `timeout`."""
        assert self._subs, "start() first"
        msgs = await self._pull_affine(max_requests)
        if msgs:
            return await self._parsed(msgs)
        batch_active = time.monotonic() < self._batch_active_until
        long_poll = min(timeout, _AFFINE_SLICE_S) if self._affine else timeout
        msgs = await self._pull(Lane.INTERACTIVE, max_requests, _LANE_PROBE_S if batch_active else long_poll)
        if not msgs:
            msgs = await self._pull(Lane.BATCH, max_requests, _LANE_PROBE_S)
            if msgs:
                self._batch_active_until = time.monotonic() + _BATCH_ACTIVE_S
        return await self._parsed(msgs)

    async def _parsed(self, msgs: list[Msg]) -> list[Delivery]:
        deliveries = []
        for msg in msgs:
            try:
                deliveries.append(Delivery(parse_work_request(msg.data), msg))
            except ValidationError as exc:
                # A malformed message can never succeed: remove it rather than redeliver it forever.
                log.warning("intake.invalid_request", error=exc.errors(include_url=False)[:3])
                await msg.term()
        return deliveries

    async def _pull_affine(self, max_requests: int) -> list[Msg]:
        """What waits on this worker's own subject, then on the subjects it took over, up to `max_requests`."""
        msgs: list[Msg] = []
        for consumer, sub in list(self._affine.items()):
            if len(msgs) >= max_requests:
                break
            try:
                msgs += await sub.fetch(batch=max_requests - len(msgs), timeout=_LANE_PROBE_S)
            except TimeoutError:
                continue
            except jse.APIError as exc:  # an election, or a taken-over consumer the server removed meanwhile
                log.warning("intake.fetch_failed", consumer=consumer, error=str(exc))
        return msgs

    async def _pull(self, lane: Lane, max_requests: int, timeout: float) -> list[Msg]:
        try:
            msgs = await self._subs[lane].fetch(batch=max_requests, timeout=timeout)
        except TimeoutError:  # covers nats' TimeoutError, FetchTimeoutError and the bare asyncio one
            self._failing_since.pop(lane, None)
            return []
        except jse.APIError as exc:
            # Consumer leader elections answer 503 for a moment; the loop simply retries.
            log.warning("intake.fetch_failed", lane=lane.value, error=str(exc))
            await self._rebind_if_stuck(lane)
            await asyncio.sleep(0.25)
            return []
        self._failing_since.pop(lane, None)
        return msgs

    async def _rebind_if_stuck(self, lane: Lane) -> None:
        now = time.monotonic()
        since = self._failing_since.setdefault(lane, now)
        if now - since < _REBIND_AFTER_S:
            return
        self._failing_since[lane] = now  # the next re-bind only after another whole period of failures
        try:
            fresh = await self._bind(lane)
        except Exception as exc:  # NATS still failing: keep the old one and try again later
            log.warning("intake.rebind_failed", lane=lane.value, error=repr(exc))
            return
        old, self._subs[lane] = self._subs[lane], fresh
        log.warning("intake.rebound", lane=lane.value, failing_s=round(now - since, 1))
        try:
            await old.unsubscribe()
        except Exception as exc:
            log.warning("intake.unsubscribe_failed", lane=lane.value, error=repr(exc))

    async def stop(self) -> None:
        for sub in [*self._subs.values(), *self._affine.values()]:
            await sub.unsubscribe()
        self._subs.clear()
        self._affine.clear()
