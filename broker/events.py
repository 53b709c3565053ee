"""Token events (core NATS, or JetStream for durable results subjects) and cancels. The edge holds ONE wildcard
subscription for all its requests, made at startup, so no first token can race a per-request subscribe."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

from broker import subjects
from contracts import CancelRequest, parse_event
from contracts.events import Accepted, End, Failed, Heartbeat, Tokens

log = structlog.get_logger(__name__)

Event = Accepted | Tokens | Heartbeat | End | Failed


async def publish_event(nc: NatsClient, reply_subject: str, event: Event, msg_id: str | None = None) -> None:
    """Live inboxes get a core publish (a lost event is recovered by the edge's resume); a durable results
    subject gets a JetStream publish that returns only once the event is stored (and raises if it was not).
    `msg_id`: a `Nats-Msg-Id`, so that stores of the same event by several processes keep one."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
    if subjects.is_durable_reply(reply_subject):
        await nc.jetstream().publish(reply_subject, event.to_bytes(), headers=headers)
    else:
        await nc.publish(reply_subject, event.to_bytes(), headers=headers)


async def publish_cancel(
    nc: NatsClient, request_id: str, reason: str = "client disconnected", up_to_attempt: int | None = None
) -> None:
    cancel = CancelRequest(request_id=request_id, reason=reason, up_to_attempt=up_to_attempt)
    await nc.publish(subjects.cancel_subject(request_id), cancel.to_bytes())


async def subscribe_cancels(nc: NatsClient, on_cancel: Callable[[CancelRequest], Awaitable[None]]):
    async def handle(msg: Msg) -> None:
        try:
            await on_cancel(CancelRequest.from_bytes(msg.data))
        except ValidationError:
            log.warning("cancel.invalid", subject=msg.subject)

    return await nc.subscribe(subjects.CANCEL_WILDCARD, cb=handle)


class EventRouter:
    """Edge side: dispatches every event on `inf.tok.<edge_id>.*` (journaled) and `inf.live.<edge_id>.*` to the
    queue of its request."""

    def __init__(self, nc: NatsClient, edge_id: str):
        self._nc = nc
        self.edge_id = edge_id
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._subs: list = []

    async def start(self) -> None:
        for journaled in (True, False):
            self._subs.append(
                await self._nc.subscribe(
                    subjects.token_wildcard(self.edge_id, journaled=journaled), cb=self._on_message
                )
            )
        await self._nc.flush()

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()

    def reply_subject(self, request_id: str, *, journaled: bool = True) -> str:
        return subjects.token_subject(self.edge_id, request_id, journaled=journaled)

    def open(self, request_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _on_message(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        queue = self._queues.get(request_id)
        if queue is None:
            return  # the client is gone; late events for it are expected
        try:
            queue.put_nowait(parse_event(msg.data))
        except ValidationError:
            log.warning("events.invalid", request_id=request_id)
