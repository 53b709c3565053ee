"""Stored responses of the Responses API (`/v1/responses`): one KV record per response, updated only by
compare-and-swap (a cancel racing the runner of a background response never loses), and the event log of
background responses on a stream, one subject per response, so any replica can replay and follow it. Both expire
after the TTL (Settings.response_ttl_s, 30 days as at OpenAI): the server deletes them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from broker import subjects
from broker.batch_store import JobQueue, QueueNames
from broker.kv import CasRecords, as_broker_errors
from broker.topology import ensure_response_jobs, ensure_response_storage
from broker.work_queue import MSG_ID_HEADER
from contracts.responses import StoredResponse

RESPONSE_QUEUE = QueueNames(
    subjects.RESPONSE_JOB_SUBJECT, subjects.RESPONSE_JOB_STREAM, subjects.RESPONSE_JOB_CONSUMER, str.encode
)


class ResponseStore(CasRecords[StoredResponse]):
    """The records, the event logs, and `queue`: tickets of background responses to run."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, queue: JobQueue, ttl_s: float):
        super().__init__(kv, StoredResponse, "resp", subjects.response_key)
        self._js = js
        self.queue = queue
        self.ttl_s = ttl_s

    @classmethod
    async def open(cls, js: JetStreamContext, ack_wait_s: float, ttl_s: float, replicas: int = 1) -> ResponseStore:
        kv = await ensure_response_storage(js, ttl_s, replicas)
        await ensure_response_jobs(js, ack_wait_s, replicas)
        return cls(kv, js, JobQueue(js, ack_wait_s, RESPONSE_QUEUE), ttl_s)

    def expired(self, record: StoredResponse, now: float | None = None) -> bool:
        """Past its TTL from creation. The server deletes the record `ttl_s` after its last write (and each event
        `ttl_s` after it was logged), which is later for a response written again as it ran: readers ask this,
        so a response expires whole, at one moment, and never shows a log whose first events are already gone."""
        created_at = record.response.get("created_at")
        return isinstance(created_at, int | float) and created_at + self.ttl_s <= (now or time.time())

    async def put(self, record: StoredResponse) -> None:
        """Store a finished response (foreground responses are written once, when they are done)."""
        with as_broker_errors():
            await self._kv.put(subjects.response_key(record.id), record.to_bytes())

    async def delete(self, response_id: str) -> None:
        with as_broker_errors():
            await self._kv.delete(subjects.response_key(response_id))
            await self._js.purge_stream(
                subjects.RESPONSE_EVENTS_STREAM, subject=subjects.response_events_subject(response_id)
            )

    async def publish_event(self, response_id: str, event: dict[str, Any]) -> None:
        """Append one event (its `sequence_number` set) to the response's log; a re-publish of the same number
        (a runner that took over re-sending) is dropped by the stream's duplicate window."""
        with as_broker_errors():
            await self._js.publish(
                subjects.response_events_subject(response_id),
                json.dumps(event).encode(),
                headers={MSG_ID_HEADER: f"{response_id}/{event['sequence_number']}"},
            )

    async def logged(self, response_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The first logged event (`response.created`) and the last one, or None if none is logged."""
        stream, subject = subjects.RESPONSE_EVENTS_STREAM, subjects.response_events_subject(response_id)
        with as_broker_errors():
            try:
                first = await self._js.get_msg(stream, seq=1, subject=subject, next=True)
                last = await self._js.get_last_msg(stream, subject)
            except jse.NotFoundError:
                return None
        return json.loads(first.data), json.loads(last.data)

    async def events(self, response_id: str) -> AsyncIterator[dict[str, Any]]:
        """The response's logged events from the first, then live ones, until the caller stops iterating."""
        sub = await self._js.subscribe(
            subjects.response_events_subject(response_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            async for msg in sub.messages:
                yield json.loads(msg.data)
        finally:
            await sub.unsubscribe()
