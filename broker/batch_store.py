"""Files and batch jobs in JetStream: file records in KV with contents in the object store (always read with
`writeinto=`: into memory is quadratic in nats-py), jobs in KV updated only by compare-and-swap on the revision a
writer last saw, line results in KV written create-only (a batch's all read back in one pass), and the job queue
runners pull tickets from."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from broker import subjects
from broker.errors import BrokerError
from broker.kv import CasRecords, as_broker_errors, latest_values, read, records
from broker.topology import ensure_batch_jobs, ensure_batch_storage
from broker.work_queue import MSG_ID_HEADER
from contracts import BatchJob, BatchTicket, FileRecord, LineResult

log = structlog.get_logger(__name__)

_FETCH_RETRY_S = 0.25


class FileMissing(BrokerError):
    """The file's record or contents do not exist (any more)."""


async def _get(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    with as_broker_errors():
        return await read(kv, key)


class FileStore:
    def __init__(self, records: KeyValue, data: ObjectStore):
        self._records = records
        self._data = data

    async def put(self, record: FileRecord, source: BinaryIO) -> FileRecord:
        """Store the contents (read from `source` in chunks), then the record with the size actually stored."""
        info = await self._data.put(record.id, source)
        stored = record.model_copy(update={"bytes": info.size})
        await self._records.put(subjects.file_key(record.id), stored.to_bytes())
        return stored

    async def get(self, file_id: str) -> FileRecord | None:
        found = await _get(self._records, subjects.file_key(file_id))
        return None if found is None else FileRecord.from_bytes(found[0])

    async def list(self) -> list[FileRecord]:
        return await records(self._records, "file", FileRecord)

    async def read_into(self, file_id: str, target: BinaryIO) -> None:
        try:
            await self._data.get(file_id, writeinto=target)
        except jse.ObjectNotFoundError:
            raise FileMissing(f"file {file_id} has no contents") from None

    async def delete(self, file_id: str) -> bool:
        if await self.get(file_id) is None:
            return False
        await self._records.delete(subjects.file_key(file_id))
        try:
            await self._data.delete(file_id)
        except (jse.ObjectNotFoundError, jse.ObjectDeletedError):
            pass
        return True


class JobStore(CasRecords[BatchJob]):
    """Batch jobs: every write a compare-and-swap, so a runner that was presumed dead never overwrites the one
    that took over."""

    def __init__(self, kv: KeyValue):
        super().__init__(kv, BatchJob, "batch", subjects.batch_key)


class ResultStore:
    """One result per (batch, custom_id), never overwritten: whichever run of a line stores first wins."""

    def __init__(self, kv: KeyValue, js: JetStreamContext):
        self._kv = kv
        self._js = js

    async def put_once(self, batch_id: str, result: LineResult) -> bool:
        """False when a result for this custom_id was already stored (the stored one stands)."""
        with as_broker_errors():
            try:
                await self._kv.create(subjects.batch_result_key(batch_id, result.custom_id), result.to_bytes())
            except jse.KeyWrongLastSequenceError:
                return False
        return True

    async def get(self, batch_id: str, custom_id: str) -> LineResult | None:
        found = await _get(self._kv, subjects.batch_result_key(batch_id, custom_id))
        return None if found is None else LineResult.from_bytes(found[0])

    def stored(self, batch_id: str) -> AsyncIterator[list[tuple[str, bytes]]]:
        """The batch's stored results in one pass, in chunks of (key, value): for reading them all (assembling the
        files, resuming the batch) without a round trip per line. Its lines' loss counts (`<result key>.lost`)
        are not results: the filter's `*` matches only the one token after the batch's prefix. A result the
        pass's consumer misses (a lagging replica) is still read (`latest_values`): it would otherwise be written
        as an unfinished line."""
        return latest_values(self._kv, f"{subjects.batch_result_prefix(batch_id)}.*")

    async def count_loss(self, batch_id: str, custom_id: str) -> int:
        """Add one to the line's count of runs its workers stopped under, and return the count. A compare-and-swap
        (create, then update on the revision read), so two runners of the batch (one presumed dead) never lose a
        count; the count outlives any runner, so the runner that resumes the batch goes on from it."""
        key = subjects.batch_line_losses_key(batch_id, custom_id)
        while True:
            found = await _get(self._kv, key)
            count = 1 if found is None else int(found[0]) + 1
            with as_broker_errors():
                try:
                    if found is None:
                        await self._kv.create(key, str(count).encode())
                    else:
                        await self._kv.update(key, str(count).encode(), last=found[1])
                except jse.KeyWrongLastSequenceError:
                    continue  # another runner counted meanwhile: count on top of it
            return count

    async def purge(self, batch_id: str) -> None:
        """Drop a finished batch's results (its output and error files hold them now) and loss counts."""
        subject = f"$KV.{subjects.BATCH_RESULTS_BUCKET}.{subjects.batch_result_prefix(batch_id)}.>"
        await self._js.purge_stream(f"KV_{subjects.BATCH_RESULTS_BUCKET}", subject=subject)


@dataclass(frozen=True, slots=True)
class QueueNames:
    subject: str
    stream: str
    consumer: str
    ticket: Callable[[str], bytes]  # a job id as the ticket's body


BATCH_QUEUE = QueueNames(
    subjects.BATCH_JOB_SUBJECT,
    subjects.BATCH_JOB_STREAM,
    subjects.BATCH_JOB_CONSUMER,
    lambda batch_id: BatchTicket(batch_id=batch_id).to_bytes(),
)


class JobQueue:
    """Tickets naming jobs to run (batches by default); one per job (deduplicated by job id)."""

    def __init__(self, js: JetStreamContext, ack_wait_s: float, names: QueueNames = BATCH_QUEUE):
        self._js = js
        self.ack_wait_s = ack_wait_s
        self._names = names
        self._sub: JetStreamContext.PullSubscription | None = None

    async def publish(self, job_id: str) -> bool:
        """Queue the job's ticket; False if one was queued already (within the stream's duplicate window)."""
        with as_broker_errors():
            ack = await self._js.publish(
                self._names.subject, self._names.ticket(job_id), timeout=2.0, headers={MSG_ID_HEADER: job_id}
            )
        return not ack.duplicate

    async def fetch(self, timeout: float = 1.0) -> Msg | None:
        """The next ticket, or None after `timeout`."""
        if self._sub is None:
            self._sub = await self._js.pull_subscribe_bind(self._names.consumer, stream=self._names.stream)
        try:
            [msg] = await self._sub.fetch(batch=1, timeout=timeout)
        except TimeoutError:
            return None
        except jse.APIError as exc:  # a consumer leader election: retry on the next call, not at once
            log.warning("job_queue.fetch_failed", stream=self._names.stream, error=str(exc))
            await asyncio.sleep(_FETCH_RETRY_S)
            return None
        return msg

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None


@dataclass(frozen=True, slots=True)
class BatchStorage:
    files: FileStore
    jobs: JobStore
    results: ResultStore
    queue: JobQueue

    @classmethod
    async def open(cls, js: JetStreamContext, ack_wait_s: float, replicas: int = 1) -> BatchStorage:
        files, file_data, batches, results = await ensure_batch_storage(js, replicas)
        await ensure_batch_jobs(js, ack_wait_s, replicas)
        return cls(FileStore(files, file_data), JobStore(batches), ResultStore(results, js), JobQueue(js, ack_wait_s))
