"""Requests in and out of a model's work queue: the edge's `publish_request` and the worker's `RequestIntake`."""

from __future__ import annotations

import asyncio
import time
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
# While batch work flows the worker polls both lanes briefly in turn; when the lane is idle it long-polls the
# interactive queue only, so a batch line waits at most one fetch timeout to be noticed.
_LANE_PROBE_S = 0.01
_BATCH_ACTIVE_S = 1.0


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
) -> bool:
    """Queue the request durably. Returns False when it was a duplicate of one already queued."""
    headers = {MSG_ID_HEADER: message_id(request, idempotency_key)}
    try:
        ack = await js.publish(lane.subject(request.model), request.to_bytes(), timeout=timeout, headers=headers)
    except jse.ServiceUnavailableError as exc:
        if exc.err_code == _ERR_QUEUE_FULL:
            raise QueueFull(request.model) from exc
        raise BrokerUnavailable(str(exc)) from exc
    except jse.BadRequestError as exc:
        if exc.err_code == _ERR_MESSAGE_TOO_LARGE:
            raise MessageTooLarge(str(exc)) from exc
        raise BrokerUnavailable(str(exc)) from exc
    except nats.errors.MaxPayloadError as exc:
        raise MessageTooLarge(str(exc)) from exc
    except jse.NoStreamResponseError as exc:
        raise QueueMissing(f"no queue exists for model {request.model!r}") from exc
    except (TimeoutError, nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
        raise BrokerUnavailable("NATS did not accept the request in time") from exc
    return not ack.duplicate


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


class RequestIntake:
    """The worker's side of the queues: pull only as many requests as there are free slots, interactive ones
    first; the batch lane only when the interactive queue has nothing waiting."""

    def __init__(self, js: JetStreamContext, model_id: str):
        self._js = js
        self._model_id = model_id
        self._subs: dict[Lane, JetStreamContext.PullSubscription] = {}
        self._batch_active_until = 0.0

    async def start(self) -> None:
        for lane in Lane:
            self._subs[lane] = await self._js.pull_subscribe_bind(
                subjects.REQUEST_CONSUMER, stream=lane.stream(self._model_id))

    async def fetch(self, max_requests: int, timeout: float = 1.0) -> list[Delivery]:
        """Up to `max_requests`; returns as soon as any arrive, or empty after about `timeout`."""
        assert self._subs, "start() first"
        batch_active = time.monotonic() < self._batch_active_until
        msgs = await self._pull(Lane.INTERACTIVE, max_requests, _LANE_PROBE_S if batch_active else timeout)
        if not msgs:
            msgs = await self._pull(Lane.BATCH, max_requests, _LANE_PROBE_S)
            if msgs:
                self._batch_active_until = time.monotonic() + _BATCH_ACTIVE_S
        deliveries = []
        for msg in msgs:
            try:
                deliveries.append(Delivery(parse_work_request(msg.data), msg))
            except ValidationError as exc:
                # A malformed message can never succeed: remove it rather than redeliver it forever.
                log.warning("intake.invalid_request", error=exc.errors(include_url=False)[:3])
                await msg.term()
        return deliveries

    async def _pull(self, lane: Lane, max_requests: int, timeout: float) -> list[Msg]:
        try:
            return await self._subs[lane].fetch(batch=max_requests, timeout=timeout)
        except TimeoutError:  # covers nats' TimeoutError, FetchTimeoutError and the bare asyncio one
            return []
        except jse.APIError as exc:
            # Consumer leader elections answer 503 for a moment; the loop simply retries.
            log.warning("intake.fetch_failed", lane=lane.value, error=str(exc))
            await asyncio.sleep(0.25)
            return []

    async def stop(self) -> None:
        for sub in self._subs.values():
            await sub.unsubscribe()
        self._subs.clear()
