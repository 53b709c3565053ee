"""One batch, run by one runner. The runner claims it (a compare-and-swap that bumps the epoch) and drives it
from whatever state it finds (a previous runner may have died anywhere) to a final state. Every write names the
revision this run last saw: a write that fails because another runner claimed the batch since is fenced, and
this run stops without writing anything more, so a runner presumed dead can never overwrite its successor.

Lines run through the batch lane with bounded concurrency; each result is stored once under its custom_id
before it counts, so a restarted run skips what is done and no line is ever run into the output twice. A line
whose workers keep dying under it fails after a budget of runs (api/batch/losses.py).

Outside its lines (one line may rightly wait long in the batch lane), a run keeps moving: `stalled_for` says how
long it has not, so its runner can give the batch up to another runner instead of holding it in a hang (a
finished batch once stayed `in_progress` for 5 minutes: chaos run, seed 22)."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import structlog

from api.auth.caller import cache_salt
from api.auth.metering import Meter
from api.batch.assemble import Tally, assemble, discard
from api.batch.lines import BatchLine, InvalidLine, LineParser, RetryLater, read_lines, run_line
from api.batch.losses import LossBudget
from api.batch.stored import StoredResults
from api.services import Services
from broker.batch_store import BatchStorage, FileMissing
from broker.errors import BrokerError
from broker.kv import StaleRevision, Versioned
from common.tasks import cancel_and_wait
from contracts import BatchJob, BatchStatus, ErrorCode, LineResult
from contracts.batch import BatchErrorItem, InvalidTransition, LineError, RequestCounts

log = structlog.get_logger(__name__)

PROGRESS_INTERVAL_S = 1.0  # how often counts are published and cancels, expiry and takeovers are noticed
STALL_S = 60.0  # a run that did nothing for this long outside its lines is given up (a dozen NATS timeouts)
_WATCHER_STOP_S = 10.0  # the watcher's NATS call in flight when the lines end (nats-py's timeout is 5 s)
_MAX_BACKOFF_S = 5.0
_MAX_UNEXPECTED_FAILURES = 5

_UNFINISHED = {
    BatchStatus.COMPLETED: LineError(code="internal", message="the line produced no result"),
    BatchStatus.EXPIRED: LineError(
        code="batch_expired", message="This request could not be executed before the completion window expired."
    ),
    BatchStatus.CANCELLED: LineError(
        code="batch_cancelled", message="This request was not executed because the batch was cancelled."
    ),
}


class Fenced(Exception):
    """Another runner claimed the batch after this run did: this run must stop and write nothing more."""


@dataclass(frozen=True, slots=True)
class RunnerContext:
    services: Services  # its engine submits to the batch lane
    storage: BatchStorage
    runner_id: str
    line_concurrency: int
    max_lines: int
    # The owner's charge-only meter (api/auth): lines count against the owner's token budget, never refused.
    meter_for_owner: Callable[[str], Awaitable[Meter | None]] | None = None
    stall_s: float = STALL_S  # the runner gives up a run that did nothing for this long outside its lines
    line_max_attempts: int = 3  # runs of a line that lost its workers before it fails (api/batch/losses.py)


def _now() -> int:
    return int(time.time())


class JobRun:
    def __init__(self, context: RunnerContext, batch_id: str):
        self._ctx = context
        self._id = batch_id
        self._held: Versioned[BatchJob] | None = None
        self._tally = Tally()
        self._stopped = asyncio.Event()
        self._stop_reason: str | None = None
        self._in_flight: set[asyncio.Task] = set()
        self._meter: Meter | None = None  # the owner's charge-only meter, once the run has claimed the batch
        self._moved_at = time.monotonic()  # when the run last did something (a write, an input chunk, a file line)
        self._lines_running = False
        self._losses = LossBudget(context.storage.results, batch_id, context.line_max_attempts)

    def stalled_for(self) -> float:
        """Seconds since the run last did something; 0 while its lines run (a line may wait in the batch lane for
        as long as its queue timeout, and its generation has timeouts of its own)."""
        return 0.0 if self._lines_running else time.monotonic() - self._moved_at

    def _moved(self) -> None:
        self._moved_at = time.monotonic()

    @property
    def job(self) -> BatchJob:
        assert self._held is not None
        return self._held.record

    async def run(self) -> None:
        """Returns once the batch is in a final state; raises Fenced when another runner took it over."""
        storage = self._ctx.storage
        claimed = await storage.jobs.change(
            self._id, lambda job: None if job.status.terminal else job.claimed_by(self._ctx.runner_id)
        )
        if claimed is None:
            log.warning("batch.ticket_without_job", batch_id=self._id)
            return
        self._held = claimed
        self._moved()
        if not self.job.status.terminal:
            log.info("batch.claimed", batch_id=self._id, status=self.job.status.value, epoch=self.job.epoch)
            with tempfile.TemporaryDirectory(prefix="inferq-batch-") as scratch:
                path = Path(scratch) / "input.jsonl"
                try:
                    with path.open("wb") as target:
                        await storage.files.read_into(self.job.input_file_id, _Moving(target, self._moved))
                except FileMissing:
                    await self._fail("input_file_missing", f"the input file {self.job.input_file_id} was deleted")
                else:
                    self._meter = await self._owner_meter()  # every line's engine client charges it
                    await self._drive(path)
        await storage.results.purge(self._id)  # the files hold them now

    async def _drive(self, path: Path) -> None:
        steps = {
            BatchStatus.VALIDATING: self._validate,
            BatchStatus.IN_PROGRESS: self._execute,
            BatchStatus.FINALIZING: lambda p: self._finish(BatchStatus.COMPLETED, p),
            BatchStatus.CANCELLING: lambda p: self._finish(BatchStatus.CANCELLED, p),
        }
        while not self.job.status.terminal:
            expired = time.time() >= self.job.expires_at
            try:
                if expired and self.job.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
                    await self._finish(BatchStatus.EXPIRED, path)
                else:
                    await steps[self.job.status](path)
            except InvalidTransition:
                self._held = await self._fresh()  # a cancel moved the batch under us: go on from where it is

    async def _owner_meter(self) -> Meter | None:
        if self._ctx.meter_for_owner is None:
            return None
        try:
            return await self._ctx.meter_for_owner(self.job.owner)
        except BrokerError as exc:  # the batch still runs; its usage is not charged this run
            log.warning("batch.meter_unavailable", batch_id=self._id, error=str(exc))
            return None

    # --- compare-and-swap writes ----------------------------------------------------------------------------
    async def _fresh(self) -> Versioned[BatchJob]:
        """The stored job, if this run still holds the claim; Fenced otherwise."""
        fresh = await self._ctx.storage.jobs.get(self._id)
        if fresh is None or (fresh.record.runner_id, fresh.record.epoch) != (self._ctx.runner_id, self.job.epoch):
            raise Fenced(self._id)
        return fresh

    async def _save(self, edit: Callable[[BatchJob], BatchJob]) -> BatchJob:
        """Apply `edit` to the job at the revision this run holds; after a conflict, to the fresh job (someone
        cancelled) unless the claim moved on (Fenced)."""
        held = self._held
        while True:
            try:
                self._held = await self._ctx.storage.jobs.write(edit(held.record), held.revision)
                self._moved()
                return self.job
            except StaleRevision:
                held = await self._fresh()

    async def _fail(self, code: str, message: str) -> None:
        error = BatchErrorItem(code=code, message=message)
        await self._save(lambda job: job.transition(BatchStatus.FAILED, _now(), errors=[error]))
        log.info("batch.failed", batch_id=self._id, code=code)

    # --- the lifecycle ----------------------------------------------------------------------------------------
    async def _validate(self, path: Path) -> None:
        total = await asyncio.to_thread(lambda: sum(1 for _ in read_lines(path)))
        if total == 0:
            return await self._fail("empty_file", "the input file has no requests")
        if total > self._ctx.max_lines:
            return await self._fail(
                "too_many_requests", f"the input file has {total} requests; the limit is {self._ctx.max_lines}"
            )
        await self._save(
            lambda job: job.transition(BatchStatus.IN_PROGRESS, _now(), request_counts=RequestCounts(total=total))
        )

    async def _execute(self, path: Path) -> None:
        self._tally, self._stop_reason = Tally(), None
        self._stopped.clear()
        lines_done = asyncio.Event()
        watcher = asyncio.create_task(self._watch(lines_done))
        self._lines_running = True
        try:
            await self._run_lines(path)
        finally:
            self._lines_running = False
            self._moved()
            await self._stop_watching(watcher, lines_done)
        if self._stop_reason == "fenced":
            raise Fenced(self._id)
        if self._stop_reason == "expired":
            return await self._finish(BatchStatus.EXPIRED, path)
        # Done, or cancelled (the transition to finalizing then fails and _drive goes on from cancelling).
        await self._save(
            lambda job: job.transition(
                BatchStatus.FINALIZING, _now(), request_counts=job.request_counts.at_least(self._tally.counts)
            )
        )

    async def _finish(self, final: BatchStatus, path: Path) -> None:
        started = time.monotonic()
        assembled = await assemble(self.job, path, self._ctx.storage, _UNFINISHED[final], on_line=self._moved)
        assemble_s = round(time.monotonic() - started, 2)
        try:
            await self._save(
                lambda job: job.transition(
                    final,
                    _now(),
                    output_file_id=assembled.output_file_id,
                    error_file_id=assembled.error_file_id,
                    request_counts=assembled.counts,
                    usage=assembled.usage,
                )
            )
        except (Fenced, InvalidTransition):
            await discard(self._ctx.storage, assembled)
            raise
        log.info(
            "batch.finished",
            batch_id=self._id,
            status=final.value,
            assemble_s=assemble_s,
            **assembled.counts.model_dump(),
        )

    # --- lines ------------------------------------------------------------------------------------------------
    async def _run_lines(self, path: Path) -> None:
        parser = LineParser(self.job.endpoint)
        slots = asyncio.Semaphore(self._ctx.line_concurrency)
        try:
            with tempfile.TemporaryFile() as spill:
                done = await StoredResults.read(self._ctx.storage.results, self._id, spill)  # by earlier runs
                await self._start_lines(path, parser, done, slots)
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        finally:  # this run is being torn down (shutdown, takeover): its lines go with it
            await cancel_and_wait(*self._in_flight)

    async def _start_lines(self, path: Path, parser: LineParser, done: StoredResults, slots: asyncio.Semaphore) -> None:
        """Start every line without a stored result (at most `slots` at once); count the others."""
        for number, raw in read_lines(path):
            if self._stopped.is_set():
                break
            parsed = parser.parse(number, raw)
            if isinstance(parsed, InvalidLine):
                self._tally.failed()
                continue
            stored = done.get(parsed.custom_id)
            if stored is not None:
                self._tally.add(stored)
                continue
            await slots.acquire()
            if self._stopped.is_set():
                slots.release()
                break
            task = asyncio.create_task(self._line(parsed))
            self._in_flight.add(task)
            task.add_done_callback(lambda finished: (self._in_flight.discard(finished), slots.release()))

    async def _line(self, line: BatchLine) -> None:
        result = await self._result_of(line)
        for attempt in itertools.count(1):
            try:
                if not await self._ctx.storage.results.put_once(self._id, result):
                    result = await self._ctx.storage.results.get(self._id, line.custom_id) or result
                break
            except BrokerError as exc:  # NATS reconnecting: the result is worth waiting for
                log.warning("batch.store_retry", batch_id=self._id, error=str(exc), attempt=attempt)
                await asyncio.sleep(min(_MAX_BACKOFF_S, attempt))
        self._tally.add(result)

    async def _result_of(self, line: BatchLine) -> LineResult:
        for attempt in itertools.count(1):
            engine = self._ctx.services.engine.keyed(self._message_key(line, attempt)).charging(self._meter)
            try:
                services = replace(self._ctx.services, engine=engine, cache_salt=cache_salt(self.job.owner))
                return await run_line(line, self.job.endpoint, services)
            except RetryLater as exc:  # no worker right now, queue full, workers lost: wait it out
                if exc.code is ErrorCode.WORKER_LOST:
                    crashed = await self._losses.lost(line.custom_id)
                    if crashed is not None:  # its workers died under every run it had: a poison line
                        return crashed
                await asyncio.sleep(min(_MAX_BACKOFF_S, exc.retry_after))
            except Exception as exc:  # unexpected (a bug, NATS gone): a few more tries, then the line fails
                log.exception("batch.line_error", batch_id=self._id, custom_id=line.custom_id)
                if attempt >= _MAX_UNEXPECTED_FAILURES:
                    return LineResult(
                        custom_id=line.custom_id,
                        status_code=500,
                        error=LineError(code="internal", message=f"the line failed: {exc}"),
                    )
                await asyncio.sleep(min(_MAX_BACKOFF_S, attempt))
        raise AssertionError("unreachable")

    def _message_key(self, line: BatchLine, attempt: int) -> str:
        """`<batch>:<custom_id>` dedups the line's work item; a retry or a later run's try is new work."""
        base = f"{self._id}:{line.custom_id}"
        return base if (self.job.epoch, attempt) == (1, 1) else f"{base}:{self.job.epoch}.{attempt}"

    # --- watching: progress, cancels, expiry, takeovers -------------------------------------------------------
    async def _watch(self, lines_done: asyncio.Event) -> None:
        while not lines_done.is_set():
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            if lines_done.is_set():
                return
            try:
                job = await self._progress()
            except Fenced:
                return self._stop("fenced")
            except BrokerError as exc:
                log.warning("batch.progress_failed", batch_id=self._id, error=str(exc))
                continue
            if job.status is BatchStatus.CANCELLING:
                return self._stop("cancelled")
            if time.time() >= job.expires_at:
                return self._stop("expired")

    async def _progress(self) -> BatchJob:
        counts = self.job.request_counts.at_least(self._tally.counts)
        if counts == self.job.request_counts:
            self._held = await self._fresh()  # nothing new to show: only look
            return self.job
        return await self._save(
            lambda job: job.model_copy(update={"request_counts": job.request_counts.at_least(self._tally.counts)})
        )

    async def _stop_watching(self, watcher: asyncio.Task, lines_done: asyncio.Event) -> None:
        """Stop the watcher. A cancel alone may be lost: under every nats-py request is Python 3.11's
        `asyncio.wait_for`, which returns a reply that arrived in the same loop step as the cancel instead of
        raising, and the watch loop would then go on for good with this run waiting for it (the likely cause of a
        finished batch left `in_progress` with no log line). The flag ends the loop at its next turn whatever
        happens to the cancel, and the wait for it is bounded."""
        lines_done.set()
        watcher.cancel()
        done, _ = await asyncio.wait({watcher}, timeout=_WATCHER_STOP_S)
        if not done:  # it ends after its NATS call; a write it makes meanwhile is a compare-and-swap like ours
            log.warning("batch.watcher_slow_to_stop", batch_id=self._id)

    def _stop(self, reason: str) -> None:
        """Stop starting lines and cancel the running ones (their generations are cancelled on the workers);
        finished results stay stored."""
        self._stop_reason = self._stop_reason or reason
        self._stopped.set()
        for task in list(self._in_flight):
            task.cancel()


class _Moving:
    """A file being written that tells the run each chunk arrived (nats-py writes the object store's chunks with
    `write`, on an executor thread)."""

    def __init__(self, target: BinaryIO, moved: Callable[[], None]):
        self._target = target
        self._moved = moved

    def write(self, chunk: bytes) -> int:
        self._moved()
        return self._target.write(chunk)
