"""KV access every store shares. nats-py's KV API raises for a missing or deleted key and for an empty listing
(and `keys()` filters by substring), so these answer None / [] instead. `CasRecords` is the one implementation
of records that are only ever updated by compare-and-swap (batch jobs, deployments)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue
from pydantic import ValidationError

from broker.errors import BrokerError, BrokerUnavailable
from contracts import Contract

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=Contract)


class StaleRevision(BrokerError):
    """Someone wrote the record since the revision this writer holds: re-read before deciding anything."""


@contextmanager
def as_broker_errors() -> Iterator[None]:
    """NATS failures (timeouts, a connection being re-established) as BrokerUnavailable, so callers that retry
    catch one type. Expected answers (not found, wrong revision) are handled inside before this."""
    try:
        yield
    except (TimeoutError, nats.errors.Error, jse.APIError) as exc:
        raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc


async def read(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    """The value and its revision (the one a compare-and-swap names), or None if there is none."""
    try:
        entry = await kv.get(key)
    except (jse.KeyNotFoundError, jse.KeyDeletedError):
        return None
    return (entry.value, entry.revision) if entry.value else None


async def records(kv: KeyValue, prefix: str, kind: type[R]) -> list[R]:
    """Every live record under `prefix.>`, read in one watch; unreadable ones are logged and skipped.

    The watcher's "caught up" marker alone is not enough: while a key is being written during the replay, the
    marker can come before other keys have arrived (a listing then missed a batch whose progress was being
    saved). So the listing also reads until it has seen every key the stream held when it began (a deleted
    key's marker counts), waiting at most `_STRAGGLER_WAIT_S` past the marker. A key updated while the watch
    replays can arrive twice: the newest value wins."""
    expected = await stored_keys(kv, f"{prefix}.>")
    watcher = await kv.watch(f"{prefix}.>")
    found: dict[str, R] = {}
    seen: set[str] = set()
    caught_up = False
    try:
        while not (caught_up and expected <= seen):
            try:
                entry = await watcher.updates(timeout=_STRAGGLER_WAIT_S if caught_up else _REPLAY_TIMEOUT_S)
            except nats.errors.TimeoutError:
                log.warning("kv.listing_incomplete", prefix=prefix, missing=len(expected - seen))
                break
            if entry is None:
                caught_up = True
                continue
            seen.add(entry.key)
            if entry.operation in (KV_DEL, KV_PURGE):
                found.pop(entry.key, None)
                continue
            try:
                found[entry.key] = kind.from_bytes(entry.value)
            except ValidationError:
                log.warning("kv.invalid_record", key=entry.key)
    finally:
        await watcher.stop()
    return list(found.values())


_REPLAY_TIMEOUT_S = 5.0
_STRAGGLER_WAIT_S = 2.0


async def stored_keys(kv: KeyValue, pattern: str = ">") -> set[str]:
    """The keys matching `pattern` the bucket's stream holds now (with a value or a delete marker), from the
    stream's subject counts. nats-py's `keys()` creates a consumer for every listing; a listing polled twice a
    second by every edge left consumers behind across node faults until the cluster refused new ones ("maximum
    consumers limit reached"), and an edge restarted then could not read the registry at all. This asks the
    stream instead and creates nothing."""
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{kv._pre}{pattern}")
    return {subject.removeprefix(kv._pre) for subject in info.state.subjects or {}}


async def latest_values(kv: KeyValue, pattern: str, chunk: int = 256) -> AsyncIterator[list[tuple[str, bytes]]]:
    """(key, value) of every live key matching `pattern`, newest value only, in chunks as they arrive: one pass
    over the bucket's stream, one request per `chunk` keys instead of one `get` per key (a 100k-line batch's
    results were 100k round trips). A deleted or purged key yields nothing; a key written during the pass may
    come twice (the later value is newer).

    The pass's consumer may sit on a replica still catching up after a node fault and deliver fewer messages than
    the stream holds (seen with the journal's consumers), so, like `records`, the pass is checked against the keys
    the stream's leader lists (`stored_keys`), and any it did not deliver are read one by one."""
    delivered: set[str] = set()
    async for messages in _scan(kv, pattern, chunk):
        delivered.update(msg.subject.removeprefix(kv._pre) for msg in messages)
        yield [(msg.subject.removeprefix(kv._pre), msg.data) for msg in messages if _is_value(msg)]
    with as_broker_errors():
        missed = await stored_keys(kv, pattern) - delivered
        if missed:
            log.warning("kv.scan_missed_keys", pattern=pattern, keys=len(missed))
        late = [(key, found[0]) for key in sorted(missed) if (found := await read(kv, key)) is not None]
    if late:
        yield late


async def _scan(kv: KeyValue, pattern: str, chunk: int) -> AsyncIterator[list[Msg]]:
    """The stream's last message of every subject matching `pattern`, in chunks. One ephemeral pull consumer (no
    acks, in memory) reads it and is deleted afterwards; if this process dies mid-pass the server drops it after
    `_SCAN_IDLE_S` (listings must not leave consumers behind: `stored_keys`)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=_SCAN_IDLE_S,
        mem_storage=True,
        num_replicas=1,
    )
    with as_broker_errors():
        sub = await kv._js.pull_subscribe(f"{kv._pre}{pattern}", stream=kv._stream, config=config)
    consumer = sub._consumer
    try:
        with as_broker_errors():
            pending = (await sub.consumer_info()).num_pending
        while pending:
            with as_broker_errors():
                try:
                    messages = await sub.fetch(batch=chunk, timeout=_SCAN_FETCH_S)
                except TimeoutError:  # what was pending went (a purge): nothing more to read
                    pending = (await sub.consumer_info()).num_pending
                    continue
            pending = messages[-1].metadata.num_pending
            yield messages
    finally:
        await _quietly_drop(kv, sub, consumer)


def _is_value(msg: Msg) -> bool:
    headers = msg.headers or {}
    return bool(msg.data) and headers.get(KV_OP) not in (KV_DEL, KV_PURGE) and KV_MARKER_REASON not in headers


async def _quietly_drop(kv: KeyValue, sub: JetStreamContext.PullSubscription, consumer: str) -> None:
    """Delete the pass's consumer (unsubscribing alone leaves it); if that fails, the server drops it once idle."""
    try:
        await sub.unsubscribe()
        await kv._js.delete_consumer(kv._stream, consumer)
    except Exception as exc:
        log.warning("kv.scan_consumer_left", consumer=consumer, error=str(exc))


_SCAN_IDLE_S = 60.0
_SCAN_FETCH_S = 5.0


@dataclass(frozen=True, slots=True)
class Versioned(Generic[R]):
    """A record and the KV revision it was read at: the only revision a compare-and-swap may name."""

    record: R
    revision: int


class CasRecords(Generic[R]):
    """Records of one kind under `prefix.<id>`, written only by compare-and-swap on the revision the writer read,
    so two writers never both win (a cancel racing a runner, an agent racing a stop)."""

    def __init__(self, kv: KeyValue, kind: type[R], prefix: str, key_of: Callable[[str], str]):
        self._kv = kv
        self._kind = kind
        self._prefix = prefix
        self._key_of = key_of

    async def create(self, record: R) -> Versioned[R]:
        revision = await self._kv.create(self._key_of(record.id), record.to_bytes())
        return Versioned(record, revision)

    async def get(self, record_id: str) -> Versioned[R] | None:
        with as_broker_errors():
            found = await read(self._kv, self._key_of(record_id))
        return None if found is None else Versioned(self._kind.from_bytes(found[0]), found[1])

    async def write(self, record: R, revision: int) -> Versioned[R]:
        """Store `record` if its key is still at `revision`; StaleRevision otherwise."""
        with as_broker_errors():
            try:
                new_revision = await self._kv.update(self._key_of(record.id), record.to_bytes(), last=revision)
            except jse.KeyWrongLastSequenceError:
                raise StaleRevision(f"{self._prefix} {record.id} changed since revision {revision}") from None
        return Versioned(record, new_revision)

    async def change(self, record_id: str, edit: Callable[[R], R | None]) -> Versioned[R] | None:
        """Read-edit-CAS until it sticks. `edit` sees the latest record and returns the new one, or None to leave
        it as it is. Returns what is stored afterwards (None: no such record). Exceptions from `edit` (an invalid
        transition) propagate."""
        while True:
            current = await self.get(record_id)
            if current is None:
                return None
            edited = edit(current.record)
            if edited is None:
                return current
            try:
                return await self.write(edited, current.revision)
            except StaleRevision:
                continue

    async def list(self) -> list[R]:
        return await records(self._kv, self._prefix, self._kind)
