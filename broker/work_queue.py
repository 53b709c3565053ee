"""Requests in and out of a model's work queue: the edge's `publish_request` and the worker's `RequestIntake`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from pydantic import ValidationError

from broker import subjects
from broker.acks import confirmed_ack
from broker.errors import BrokerUnavailable, MessageTooLarge, QueueFull, QueueMissing
from broker.last_delivery import note_last_delivery
from broker.topology import REQUEST_MAX_DELIVER
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
# Free slots left after a pull of interactive work go to the batch lane at least this often, even while
# interactive requests keep arriving (each one ends the interactive long-poll, so "wait until the interactive
# lane is idle for a whole fetch" starved batch work for as long as interactive traffic flowed: chaos seed 22).
_BATCH_PROBE_EVERY_S = 0.5
# With affinity the worker's own subject is probed first, and the shared queue is long-polled in slices this short,
# so a request published to the worker's own subject while it idles waits at most about this long (a pending pull
# cannot be taken back, so two queues cannot both be long-polled within one slot budget).
_AFFINE_SLICE_S = 0.1
# A consumer election answers 503 for seconds; a pull that fails for longer than this re-binds its subscription
# (a new inbox and pull request path) instead of repeating the same failing pull forever.
_REBIND_AFTER_S = 10.0
# A held request given back is queued again within this long, or else nak'ed (NATS failing: a frozen node).
_GIVE_BACK_RETRY_S = 5.0
_GIVE_BACK_NAK_DELAY_S = 1.0


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


@dataclass(frozen=True, slots=True)
class Queued:
    """Where a published request sits in its work queue (for a duplicate: where the first copy went)."""

    stream: str
    seq: int
    duplicate: bool


async def publish_request(js: JetStreamContext, request: GenerateRequest | EmbedRequest, **options: Any) -> bool:
    """Queue the request durably, with enqueue_request's options. Returns False when it was a duplicate of one
    already queued."""
    return not (await enqueue_request(js, request, **options)).duplicate


async def enqueue_request(
    js: JetStreamContext,
    request: GenerateRequest | EmbedRequest,
    *,
    idempotency_key: str | None = None,
    timeout: float = 2.0,
    lane: Lane = Lane.INTERACTIVE,
    headers: Mapping[str, str] | None = None,
    retry_for_s: float = PUBLISH_RETRY_S,
    subject: str | None = None,
) -> Queued:
    """Queue the request durably; where it went. `headers` go along with the message (the trace context, see
    broker/tracing.py). `subject`: a worker's own subject (subjects.affine_subject) instead of the lane's shared
    one; the same stream holds both, so the queue cap and the deduplication are the same.

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
            return Queued(ack.stream, ack.seq, bool(ack.duplicate))
        except Exception as exc:
            error = _publish_error(exc, request.model)
            if not isinstance(error, _Passing) or time.monotonic() + delay > deadline:
                log.warning("publish.failed", request_id=request.request_id, error=repr(exc))
                raise error.final() if isinstance(error, _Passing) else error from exc
            log.warning("publish.retrying", request_id=request.request_id, error=str(exc), delay_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _MAX_RETRY_DELAY_S)


async def still_queued(js: JetStreamContext, queued: Queued) -> bool | None:
    """Whether the request is still in its work queue (waiting, or handed to a worker that has not taken it on
    yet); False once it left (a worker accepted it, or it was dropped); None when NATS cannot say right now.
    Asks the stream's leader, never a replica that may lag."""
    try:
        await js.get_msg(queued.stream, queued.seq, direct=False)
    except jse.NotFoundError:
        return False
    except Exception as exc:  # a node down or an election: no answer is not an answer
        log.debug("queue.probe_failed", stream=queued.stream, error=repr(exc))
        return None
    return True


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
    def num_delivered(self) -> int:
        """1 for the first delivery; more when a worker took it before and did not ack it (or its ack was lost)."""
        return self.msg.metadata.num_delivered

    @property
    def held_attempt(self) -> int:
        return held_attempt(self.request, self.num_delivered)

    @property
    def headers(self) -> dict[str, str]:
        return self.msg.headers or {}

    @property
    def published_at(self) -> float:
        """Unix time the request entered the queue (the stream's timestamp, on the NATS server's clock)."""
        return self.msg.metadata.timestamp.timestamp()


def held_attempt(request: GenerateRequest | EmbedRequest, num_delivered: int) -> int:
    """The attempt a held (fire-and-forget) request runs as on its `num_delivered`-th delivery: each delivery starts
    over, so its events must not mix with an earlier delivery's (readers keep the newest attempt, broker/results.py)."""
    return request.attempt + num_delivered - 1


def requeued(request: GenerateRequest | EmbedRequest) -> GenerateRequest | EmbedRequest:
    """A held request as it is queued again when a worker gives it back: numbered past every attempt its message
    can still run as (REQUEST_MAX_DELIVER deliveries), so their events never mix; and the same copy whichever
    delivery of the message gives it back, so JetStream's deduplication (`Nats-Msg-Id`) queues it once."""
    return request.model_copy(update={"attempt": request.attempt + REQUEST_MAX_DELIVER})


async def give_back(js: JetStreamContext, delivery: Delivery) -> None:
    """Queue a held request again for another worker, at once and with a fresh delivery budget, then ack the
    message it came in. A nak would spend one of the message's REQUEST_MAX_DELIVER deliveries on every NATS hiccup
    the request ran into, and after the last one it is never delivered again, nor answered (the chaos run's
    direct publishes without a result). When NATS takes no copy: a delayed nak; when not even that, the ack wait
    redelivers it."""
    try:
        await enqueue_request(
            js,
            requeued(delivery.request),
            subject=delivery.msg.subject,
            headers={name: value for name, value in delivery.headers.items() if not name.startswith("Nats-")},
            retry_for_s=_GIVE_BACK_RETRY_S,
        )
    except Exception as exc:
        log.warning("queue.give_back_failed", request_id=delivery.request.request_id, error=repr(exc))
        with contextlib.suppress(Exception):
            await delivery.msg.nak(delay=_GIVE_BACK_NAK_DELAY_S)
        return
    await confirmed_ack(delivery.msg)


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
        self._batch_due_at = 0.0  # when free slots must next be offered to the batch lane

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
        """Up to `max_requests`; returns as soon as any arrive, or empty after about `timeout`. Interactive
        requests first; the slots they leave go to batch work when the interactive pull found nothing, and at
        least every _BATCH_PROBE_EVERY_S while it keeps finding some."""
        assert self._subs, "start() first"
        msgs = await self._pull_affine(max_requests)
        if not msgs:
            batch_active = time.monotonic() < self._batch_active_until
            long_poll = min(timeout, _AFFINE_SLICE_S) if self._affine else timeout
            msgs = await self._pull(Lane.INTERACTIVE, max_requests, _LANE_PROBE_S if batch_active else long_poll)
        if len(msgs) < max_requests and (not msgs or time.monotonic() >= self._batch_due_at):
            self._batch_due_at = time.monotonic() + _BATCH_PROBE_EVERY_S
            batch = await self._pull(Lane.BATCH, max_requests - len(msgs), _LANE_PROBE_S)
            if batch:
                self._batch_active_until = time.monotonic() + _BATCH_ACTIVE_S
            msgs = [*msgs, *batch]
        return await self._parsed(msgs)

    async def _parsed(self, msgs: list[Msg]) -> list[Delivery]:
        deliveries = []
        for msg in msgs:
            try:
                request = parse_work_request(msg.data)
            except ValidationError as exc:
                # A malformed message can never succeed: remove it rather than redeliver it forever.
                log.warning("intake.invalid_request", error=exc.errors(include_url=False)[:3])
                await msg.term()
                continue
            await note_last_delivery(self._js, request, msg)
            deliveries.append(Delivery(request, msg))
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
