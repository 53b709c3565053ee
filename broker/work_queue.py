"""Requests in and out of a model's work queue: the edge's `publish_request` and the worker's `RequestIntake`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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
) -> bool:
    """Queue the request durably. Returns False when it was a duplicate of one already queued."""
    headers = {MSG_ID_HEADER: message_id(request, idempotency_key)}
    try:
        ack = await js.publish(
            subjects.request_subject(request.model), request.to_bytes(), timeout=timeout, headers=headers
        )
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
    """The worker's side of the queue: pull only as many requests as there are free slots."""

    def __init__(self, js: JetStreamContext, model_id: str):
        self._js = js
        self._model_id = model_id
        self._sub: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        self._sub = await self._js.pull_subscribe_bind(
            subjects.REQUEST_CONSUMER, stream=subjects.request_stream(self._model_id)
        )

    async def fetch(self, max_requests: int, timeout: float = 1.0) -> list[Delivery]:
        """Up to `max_requests`; returns as soon as any arrive, or empty after `timeout`."""
        assert self._sub is not None, "start() first"
        try:
            msgs = await self._sub.fetch(batch=max_requests, timeout=timeout)
        except TimeoutError:  # covers nats' TimeoutError, FetchTimeoutError and the bare asyncio one
            return []
        except jse.APIError as exc:
            # Consumer leader elections answer 503 for a moment; the loop simply retries.
            log.warning("intake.fetch_failed", error=str(exc))
            await asyncio.sleep(0.25)
            return []
        deliveries = []
        for msg in msgs:
            try:
                deliveries.append(Delivery(parse_work_request(msg.data), msg))
            except ValidationError as exc:
                # A malformed message can never succeed: remove it rather than redeliver it forever.
                log.warning("intake.invalid_request", error=exc.errors(include_url=False)[:3])
                await msg.term()
        return deliveries

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
