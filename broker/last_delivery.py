"""A fire-and-forget request's last delivery leaves a copy of the request behind, so its publisher is answered even
when the request's workers all died while no api ran.

A max-deliveries watcher (broker/max_deliveries.py) answers a request by reading it from its work queue. The queue
keeps the message only for its max age (600 s); if no api replica runs from the last delivery until then, the
watcher that starts later could not learn the request's id or reply subject, and a publisher waiting on its
results subject would wait for ever (JetStream removes a message by age without an advisory). So the worker that
takes a fire-and-forget request's last delivery (`max_deliver`) first stores a copy of it in the results stream,
under the queue's stream and sequence (subjects.last_delivery_subject), kept as long as results are; the watcher
reads that copy when the queue no longer has the message. Only the last delivery, and only a results subject: a
request's third delivery comes after two workers died or lost their acks, so this costs one publish in rare cases,
and a live request's edge is an api replica, which is not there to be answered in this case."""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse

from broker import subjects
from broker.topology import REQUEST_MAX_DELIVER
from contracts import EmbedRequest, GenerateRequest

log = structlog.get_logger(__name__)

_NOTE_TIMEOUT_S = 2.0


async def note_last_delivery(js: JetStreamContext, request: GenerateRequest | EmbedRequest, msg: Msg) -> None:
    """Store the copy, before the request runs, if this is a fire-and-forget request's last delivery. Best effort:
    without it the watcher still answers from the queue while the message is there."""
    meta = msg.metadata
    if meta.num_delivered < REQUEST_MAX_DELIVER or not subjects.is_durable_reply(request.reply_subject):
        return
    try:
        await js.publish(
            subjects.last_delivery_subject(meta.stream, meta.sequence.stream), msg.data, timeout=_NOTE_TIMEOUT_S
        )
    except Exception as exc:  # NATS failing: the request still runs
        log.warning("intake.last_delivery_not_noted", request_id=request.request_id, error=repr(exc))


async def noted_request(js: JetStreamContext, stream: str, seq: int) -> bytes | None:
    """The copy a last delivery left of message `seq` of `stream`, or None."""
    try:
        return (await js.get_last_msg(subjects.RESULTS_STREAM, subjects.last_delivery_subject(stream, seq))).data
    except jse.NotFoundError:
        return None
