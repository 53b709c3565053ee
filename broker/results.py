"""Reading back a fire-and-forget result: the events a worker stored on a durable results subject
(`subjects.RESULTS_PREFIX`). A request that outlived a worker crash was redelivered and generated again under
a higher attempt number, so a reader keeps only the newest attempt's events."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field

import structlog
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker import subjects
from broker.events import Event
from contracts import parse_event
from contracts.events import End, Failed

log = structlog.get_logger(__name__)

_CATCH_UP_S = 1.0  # how long a reader waits for the next stored event before deciding there is none
_BATCH = 256
_ABANDONED_S = 30.0


@dataclass(slots=True)
class StoredResult:
    attempt: int = 0
    events: list[Event] = field(default_factory=list)  # the newest attempt's, in the order they were stored

    @property
    def finished(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], End | Failed)

    def add(self, event: Event) -> None:
        if event.attempt > self.attempt:  # a redelivery started over: its predecessor's events are void
            self.attempt, self.events = event.attempt, []
        if event.attempt == self.attempt:
            self.events.append(event)


async def read_result(js: JetStreamContext, reply_subject: str, wait_s: float = 0.0) -> StoredResult:
    """Everything stored on `reply_subject` so far; with `wait_s`, keeps reading until the newest attempt has
    finished or `wait_s` passed. A subject nothing was stored on gives an empty result."""
    if not subjects.is_durable_reply(reply_subject):
        raise ValueError(f"{reply_subject} is not a results subject ({subjects.RESULTS_PREFIX}...)")
    result = StoredResult()
    deadline = time.monotonic() + wait_s
    # A named consumer filtered on the subject: its create request names the filter, so NATS permissions can
    # confine a publisher to reading its own results namespace.
    name = f"read_{uuid.uuid4().hex[:16]}"
    await js.add_consumer(
        subjects.RESULTS_STREAM,
        ConsumerConfig(
            name=name,
            filter_subject=reply_subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_ABANDONED_S,
            mem_storage=True,
        ),
    )
    try:
        sub = await js.pull_subscribe_bind(name, stream=subjects.RESULTS_STREAM)
        while not result.finished:
            try:
                msgs = await sub.fetch(batch=_BATCH, timeout=max(deadline - time.monotonic(), _CATCH_UP_S))
            except TimeoutError:
                break
            for msg in msgs:
                result.add(parse_event(msg.data))
            if msgs[-1].metadata.num_pending == 0 and time.monotonic() >= deadline:
                break  # read all there is, and not asked to wait for more
        await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):  # left behind, the server drops it after _ABANDONED_S anyway
            await js.delete_consumer(subjects.RESULTS_STREAM, name)
    return result


async def result_finished(js: JetStreamContext, reply_subject: str) -> bool | None:
    """Whether the newest attempt stored on `reply_subject` has finished; None when NATS cannot say now. Cheap
    when it has not (one lookup of the last stored event); reads the stored events only when that one ends an
    attempt, which may be a superseded attempt's while a newer one runs."""
    try:
        last = await js.get_last_msg(subjects.RESULTS_STREAM, reply_subject)
        if not isinstance(parse_event(last.data), End | Failed):
            return False
        return (await read_result(js, reply_subject)).finished
    except jse.NotFoundError:
        return False
    except Exception as exc:  # a node down, an election
        log.debug("results.lookup_failed", subject=reply_subject, error=repr(exc))
        return None
