"""Reading back a fire-and-forget result: the events a worker stored on a durable results subject
(`subjects.RESULTS_PREFIX`). A request that outlived a worker crash was redelivered and generated again under
a higher attempt number, so a reader keeps only the newest attempt's events."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nats.js import JetStreamContext

from broker import subjects
from broker.events import Event
from contracts import parse_event
from contracts.events import End, Failed

_CATCH_UP_S = 1.0  # how long a reader waits for the next stored event before deciding there is none


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
    sub = await js.subscribe(reply_subject, stream=subjects.RESULTS_STREAM, ordered_consumer=True)
    try:
        while not result.finished:
            try:
                msg = await sub.next_msg(timeout=max(deadline - time.monotonic(), _CATCH_UP_S))
            except TimeoutError:
                break
            result.add(parse_event(msg.data))
            if msg.metadata.num_pending == 0 and time.monotonic() >= deadline:
                break  # read all there is, and not asked to wait for more
    finally:
        await sub.unsubscribe()
    return result
