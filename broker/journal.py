"""Reading back one request's token events from the journal (subjects.JOURNAL_STREAM), from its first event on
and then live as they are published: how an edge that did not submit a request follows it (a resumed SSE stream,
a retried POST attaching to its request)."""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from broker import subjects
from broker.errors import BrokerUnavailable
from broker.events import Event
from common.tasks import cancel_and_wait
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


# Workers send a heartbeat after a second of silence while they run a request, so a reader that hears nothing for
# longer follows a request that is queued or finished, or a consumer that stopped delivering: then read the journal
# directly. (The edge passes half its silence timeout.)
CATCH_UP_AFTER_S = 1.5


class JournalFollower:
    """An ordered consumer over one request's journaled events, every attempt's and every edge's, in the order
    they were published; `events` fills as they arrive. Close it when done.

    The consumer alone is not trusted to deliver: after a NATS node fault one was seen to deliver none of a
    finished request's stored events for minutes (chaos run, seed 2026, `keyed2.404.dup`). Whenever it has been
    quiet for `catch_up_after_s`, the events stored after the last one handed on are read from the stream's leader
    one by one; if there were any, the consumer missed them and is made anew from there. Events are handed on by
    stream sequence, so each goes out once, whichever way it came."""

    def __init__(self, js: JetStreamContext, request_id: str, catch_up_after_s: float = CATCH_UP_AFTER_S):
        self._js = js
        self.request_id = request_id
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._catch_up_after_s = catch_up_after_s
        self._sub = None
        self._last_seq = 0  # stream sequence of the last event handed on
        self._heard_at = time.monotonic()
        self._watch: asyncio.Task | None = None

    async def start(self) -> JournalFollower:
        try:
            await self._subscribe()
        except (TimeoutError, jse.Error) as exc:
            raise BrokerUnavailable(f"the token journal cannot be read: {exc}") from exc
        self._watch = asyncio.create_task(self._catch_up_while_quiet())
        return self

    async def close(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            await cancel_and_wait(watch)
        await self._unsubscribe()

    async def _subscribe(self) -> None:
        """An ordered consumer from the event after the last one handed on."""
        self._sub = await self._js.subscribe(
            subjects.journal_filter(self.request_id),
            stream=subjects.JOURNAL_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=self._last_seq + 1),
        )

    async def _unsubscribe(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is going away: its consumer goes with it
                log.debug("journal.unsubscribe_failed", request_id=self.request_id, error=str(exc))

    async def _catch_up_while_quiet(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._heard_at + self._catch_up_after_s - time.monotonic()))
            if time.monotonic() - self._heard_at < self._catch_up_after_s:
                continue  # heard something meanwhile
            try:
                missed = await self._read_stored()
                if missed:
                    log.warning("journal.consumer_missed_events", request_id=self.request_id, events=missed)
                    await self._unsubscribe()
                    await self._subscribe()
            except Exception as exc:  # a node down, an election: read again after the next quiet spell
                log.info("journal.catch_up_failed", request_id=self.request_id, error=repr(exc))
            self._heard_at = time.monotonic()

    async def _read_stored(self) -> int:
        """Hand on the events stored after the last one handed on, read from the stream's leader (a replica, or a
        consumer on one, may lag); how many there were."""
        handed_on = 0
        seq = self._last_seq + 1
        while True:
            try:
                stored = await self._js.get_msg(
                    subjects.JOURNAL_STREAM, seq, subjects.journal_filter(self.request_id), direct=False, next=True
                )
            except jse.NotFoundError:
                return handed_on
            handed_on += self._hand_on(stored.seq, stored.data or b"", stored.subject)
            seq = max(seq, stored.seq + 1)

    async def _on_message(self, msg: Msg) -> None:
        self._hand_on(msg.metadata.sequence.stream, msg.data, msg.subject)

    def _hand_on(self, seq: int, data: bytes, subject: str) -> bool:
        if seq <= self._last_seq:
            return False  # handed on already, by the other way of reading
        self._last_seq = seq
        self._heard_at = time.monotonic()
        try:
            self.events.put_nowait(parse_event(data))
        except ValidationError:
            log.warning("journal.invalid_event", request_id=self.request_id, subject=subject)
        return True
