"""Reading back one request's token events from the journal (subjects.JOURNAL_STREAM), from its first event on
and then live as they are published: how an edge that did not submit a request follows it (a resumed SSE stream,
a retried POST attaching to its request)."""

from __future__ import annotations

import asyncio

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from broker import subjects
from broker.errors import BrokerUnavailable
from broker.events import Event
from contracts import parse_event

log = structlog.get_logger(__name__)


async def journal_has(js: JetStreamContext, request_id: str) -> bool:
    """Whether the journal still holds events of `request_id` (it keeps them for Settings.journal_max_age_s)."""
    try:
        info = await js.stream_info(subjects.JOURNAL_STREAM, subjects_filter=subjects.journal_filter(request_id))
    except jse.NotFoundError:
        return False
    except (TimeoutError, jse.Error) as exc:
        raise BrokerUnavailable(f"the token journal cannot be read: {exc}") from exc
    return bool(info.state.subjects)


async def latest_journaled_attempt(js: JetStreamContext, reply_subject: str) -> int | None:
    """The attempt of the newest event the journal holds on `reply_subject` (0: none); None when it cannot say
    (the subject is not journaled, or the journal cannot be read right now). One lookup, no consumer."""
    if not subjects.is_journaled_reply(reply_subject):
        return None
    try:
        last = await js.get_last_msg(subjects.JOURNAL_STREAM, reply_subject)
    except jse.NotFoundError:
        return 0
    except Exception as exc:  # a node down, an election, no journal on this server
        log.debug("journal.lookup_failed", subject=reply_subject, error=repr(exc))
        return None
    try:
        return parse_event(last.data).attempt
    except ValidationError:
        return None


class JournalFollower:
    """An ordered consumer over one request's journaled events, every attempt's and every edge's, in the order
    they were published; `events` fills as they arrive. Close it when done."""

    def __init__(self, js: JetStreamContext, request_id: str):
        self._js = js
        self.request_id = request_id
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._sub = None

    async def start(self) -> JournalFollower:
        try:
            self._sub = await self._js.subscribe(
                subjects.journal_filter(self.request_id),
                stream=subjects.JOURNAL_STREAM,
                cb=self._on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
        except (TimeoutError, jse.Error) as exc:
            raise BrokerUnavailable(f"the token journal cannot be read: {exc}") from exc
        return self

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is going away: its consumer goes with it
                log.debug("journal.unsubscribe_failed", request_id=self.request_id, error=str(exc))

    async def _on_message(self, msg: Msg) -> None:
        try:
            self.events.put_nowait(parse_event(msg.data))
        except ValidationError:
            log.warning("journal.invalid_event", request_id=self.request_id, subject=msg.subject)
