"""A request whose workers died `max_deliver` times running it gets a stored `error`, not silence.

JetStream hands a request to workers at most REQUEST_MAX_DELIVER times (broker/topology.py): a request that kills
every worker it reaches must not take the fleet down one worker after another. After the last delivery's ack wait
the server never delivers the message again, keeps it in the work queue (until the queue's max age) and publishes
a max-deliveries advisory, a core NATS message naming the stream and the message's sequence. Nothing else happens:
a direct publisher waiting on a durable results subject would wait forever, an edge until its queue timeout (and a
batch line would then run again, on three more workers).

A stream of ours keeps those advisories (topology.ensure_max_deliveries_stream), so none is missed while no watcher
runs, and every api replica runs a `MaxDeliveriesWatcher` on one shared durable consumer. Settling an advisory:
read the request from its queue (by sequence, from the stream's leader; once the queue dropped it at its max age,
from the copy a fire-and-forget request's last delivery left, broker/last_delivery.py), publish a terminal `error` event
(`worker_crashed`) on its reply subject as a worker would have, delete the message, ack the advisory. Settling is
idempotent, so two watchers (or one trying again after a NATS failure) answer a request once: the event carries a
`Nats-Msg-Id` derived from the stream and sequence (a results subject stores one copy within the results stream's
duplicate window), a result that is already finished gets none, and once the message is deleted there is nothing
left to settle."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from enum import StrEnum

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from pydantic import ValidationError

from broker import subjects
from broker.acks import confirmed_ack
from broker.events import publish_event
from broker.last_delivery import noted_request
from broker.results import result_finished
from broker.work_queue import held_attempt
from common.tasks import cancel_and_wait
from contracts import ErrorCode, ErrorInfo, Failed, parse_work_request

log = structlog.get_logger(__name__)

_BATCH = 16
_FETCH_TIMEOUT_S = 1.0
_RETRY_S = 1.0  # after a NATS failure: pause, then pull (or settle) again
_ACK_CONFIRM_S = 5.0  # an ack left unconfirmed only has the advisory settled again, which changes nothing
_NO_MESSAGE_FOUND = 10057  # what deleting a message that is gone already answers (a 500, not a 404)


@dataclass(frozen=True, slots=True)
class MaxDeliveries:
    """The fields of JetStream's `io.nats.jetstream.advisory.v1.max_deliver` advisory that say which message."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int

    @classmethod
    def from_bytes(cls, data: bytes) -> MaxDeliveries | None:
        try:
            body = json.loads(data)
            return cls(str(body["stream"]), str(body["consumer"]), int(body["stream_seq"]), int(body["deliveries"]))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def msg_id(self) -> str:
        """The `Nats-Msg-Id` of the error stored for this message: the same from every watcher."""
        return f"max_deliveries.{self.stream}.{self.stream_seq}"


class Settled(StrEnum):
    ANSWERED = "answered"  # an error event went to the request's reply subject
    FINISHED = "finished"  # its durable result had finished already (a worker's ack was lost): nothing to add
    # No longer in its queue (acked after all, aged out, or settled by another watcher) and no copy of it left.
    GONE = "gone"
    NOT_A_REQUEST = "not_a_request"  # not a model's work queue, or a message that is no request


async def settle(nc: NatsClient, advisory: MaxDeliveries) -> Settled:
    """Answer the request the advisory names with a `worker_crashed` error and remove it from its queue. Raises
    when NATS fails on the way (the caller tries again later; every step may be repeated)."""
    if not subjects.is_request_stream(advisory.stream):
        return Settled.NOT_A_REQUEST
    js = nc.jetstream()
    try:
        data = (await js.get_msg(advisory.stream, advisory.stream_seq, direct=False)).data
        queued = True
    except jse.NotFoundError:
        # Aged out of its queue while no watcher ran: a fire-and-forget request's last delivery left a copy.
        data, queued = await noted_request(js, advisory.stream, advisory.stream_seq), False
        if data is None:
            return Settled.GONE
    try:
        request = parse_work_request(data)
    except ValidationError:
        await _delete(js, advisory)
        return Settled.NOT_A_REQUEST
    reply = request.reply_subject
    durable = subjects.is_durable_reply(reply)
    if durable and await result_finished(js, reply) is True:
        await _delete(js, advisory)
        return Settled.FINISHED
    # A held request's attempt grows with each delivery: the error belongs to the last one, so readers that keep
    # the newest attempt (broker/results.py) end with it. A live request keeps its attempt, as its edge expects.
    attempt = held_attempt(request, advisory.deliveries) if durable else request.attempt
    error = ErrorInfo(
        code=ErrorCode.WORKER_CRASHED,
        message=f"the request's workers died {advisory.deliveries} times running it; it is not retried",
    )
    failed = Failed(request_id=request.request_id, attempt=attempt, seq=1, error=error)
    await publish_event(nc, reply, failed, msg_id=advisory.msg_id)
    log.error(
        "request.workers_died",
        request_id=request.request_id,
        model=request.model,
        reply_subject=reply,
        stream=advisory.stream,
        seq=advisory.stream_seq,
        deliveries=advisory.deliveries,
        still_queued=queued,
    )
    await _delete(js, advisory)
    return Settled.ANSWERED


async def _delete(js: JetStreamContext, advisory: MaxDeliveries) -> None:
    """Out of the work queue: it would otherwise hold a place under the queue's cap until its max age."""
    try:
        await js.delete_msg(advisory.stream, advisory.stream_seq)
    except jse.APIError as exc:
        if not isinstance(exc, jse.NotFoundError) and exc.err_code != _NO_MESSAGE_FOUND:
            raise
        # deleted by another watcher meanwhile


async def _unsubscribed(sub) -> None:
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class MaxDeliveriesWatcher:
    """Settles the advisories kept in subjects.MAX_DELIVERIES_STREAM, pulling from the durable consumer every
    watcher shares (topology.ensure_max_deliveries_queue must have made it). `answered` counts the errors this
    watcher published."""

    def __init__(self, nc: NatsClient):
        self._nc = nc
        self._task: asyncio.Task | None = None
        self.answered = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="max-deliveries")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await cancel_and_wait(task)

    async def _watch(self) -> None:
        js = self._nc.jetstream()
        sub = None
        try:
            while True:
                try:
                    if sub is None:
                        sub = await js.pull_subscribe_bind(
                            subjects.MAX_DELIVERIES_CONSUMER, stream=subjects.MAX_DELIVERIES_STREAM
                        )
                    msgs = await sub.fetch(batch=_BATCH, timeout=_FETCH_TIMEOUT_S)
                except TimeoutError:  # nothing to settle (nats' FetchTimeoutError is one too)
                    continue
                except Exception as exc:  # an election, NATS reconnecting: bind afresh and pull again
                    log.warning("max_deliveries.fetch_failed", error=repr(exc))
                    sub = await _unsubscribed(sub)
                    await asyncio.sleep(_RETRY_S)
                    continue
                for msg in msgs:
                    await self._handle(msg)
        finally:  # a subscription left behind would hold up the connection's drain for its whole timeout
            await _unsubscribed(sub)

    async def _handle(self, msg: Msg) -> None:
        advisory = MaxDeliveries.from_bytes(msg.data)
        try:
            outcome = Settled.NOT_A_REQUEST if advisory is None else await settle(self._nc, advisory)
        except Exception as exc:  # NATS failing: settle it again shortly (or after the ack wait, if the nak is lost)
            log.warning("max_deliveries.settle_failed", advisory=_text(msg), error=repr(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=_RETRY_S)
            return
        if outcome is Settled.ANSWERED:
            self.answered += 1
        else:
            log.info("max_deliveries.settled", outcome=outcome.value, advisory=_text(msg))
        await confirmed_ack(msg, _ACK_CONFIRM_S)


def _text(msg: Msg) -> str:
    return msg.data[:300].decode(errors="replace")
