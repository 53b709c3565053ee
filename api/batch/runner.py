"""The batch runner, hosted by any api replica (started in the lifespan). It pulls batch tickets from the job
queue (one durable consumer shared by every runner), heartbeats each ticket while its batch runs, and acks it
only once the batch is in a final state. A runner that dies simply stops heartbeating: its ticket goes to
another runner after the consumer's ack wait, which claims the batch (fencing the old one) and resumes it from
its stored results. A runner that is fenced never acks: the server would accept that stale ack and delete the
ticket its successor is working on."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

from api.auth.metering import Meter
from api.batch.job import STALL_S, Fenced, JobRun, RunnerContext
from api.generation import Timeouts
from api.job_tickets import heartbeat_interval, keep_alive, pull_tickets
from api.services import Services
from broker.batch_store import BatchStorage
from broker.errors import BrokerError
from broker.work_queue import Lane
from common.tasks import cancel_and_wait
from contracts import BatchStatus, BatchTicket

log = structlog.get_logger(__name__)

_RETRY_DELAY_S = 5.0  # a batch whose run failed unexpectedly is retried (by any runner) after this
_GIVE_UP_WAIT_S = 5.0  # how long a run given up (stalled, or the runner stopping) is waited for


class BatchRunner:
    def __init__(
        self,
        services: Services,
        storage: BatchStorage,
        nc: NatsClient,
        meter_for_owner: Callable[[str], Awaitable[Meter | None]] | None = None,
        stall_s: float = STALL_S,
    ):
        settings = services.settings
        lines = services.engine.in_lane(
            Lane.BATCH, Timeouts(queue_s=settings.batch_line_timeout_s, silence_s=settings.worker_silence_timeout_s)
        )
        self.runner_id = f"r{uuid.uuid4().hex[:12]}"
        # Lines may wait in the batch lane behind interactive work far longer than interactive requests may.
        line_settings = settings.model_copy(update={"queue_timeout_s": settings.batch_line_timeout_s})
        self._context = RunnerContext(
            services=replace(services, engine=lines, settings=line_settings),
            storage=storage,
            runner_id=self.runner_id,
            line_concurrency=settings.batch_line_concurrency,
            max_lines=settings.batch_max_lines,
            meter_for_owner=meter_for_owner,
            stall_s=stall_s,
            line_max_attempts=settings.batch_line_max_attempts,
        )
        self._storage = storage
        self._max_jobs = settings.batch_jobs_per_runner
        self._heartbeat_s = heartbeat_interval(storage.queue)
        self._sweep_s = settings.batch_orphan_sweep_s
        self._jobs: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._serve(), name="batch-runner")
        self._sweeper = asyncio.create_task(self._sweep_orphans(), name="batch-orphan-sweep")
        log.info("batch_runner.started", runner_id=self.runner_id)

    async def stop(self) -> None:
        """Stop pulling; batches still running are handed back (nak) so another runner resumes them at once."""
        await cancel_and_wait(self._loop, self._sweeper, *self._jobs)
        await self._storage.queue.stop()

    async def _serve(self) -> None:
        await pull_tickets(self._storage.queue, self._handle, self._jobs, self._max_jobs, "batch_runner")

    async def _handle(self, msg: Msg) -> None:
        try:
            ticket = BatchTicket.from_bytes(msg.data)
        except ValidationError:
            await msg.term()  # can never name a batch
            return
        run = JobRun(self._context, ticket.batch_id)
        work = asyncio.create_task(run.run(), name=f"batch-{ticket.batch_id}")
        heartbeat = asyncio.create_task(keep_alive(msg, self._heartbeat_s, "batch"))
        try:
            if not await self._finished(work, run):
                log.error(
                    "batch.stalled",
                    batch_id=ticket.batch_id,
                    runner_id=self.runner_id,
                    stalled_s=round(run.stalled_for(), 1),
                )
                await _give_up(work)
                await _quietly(msg.nak())  # another runner claims it at once, which fences this run for good
                return
            await work
        except Fenced:
            log.warning("batch.fenced", batch_id=ticket.batch_id, runner_id=self.runner_id)
            return  # the ticket belongs to the runner that took over: no ack, no nak
        except asyncio.CancelledError:
            await asyncio.shield(_give_up(work))
            await asyncio.shield(_quietly(msg.nak()))  # shutting down: someone else takes it now
            raise
        except Exception:
            log.exception("batch.run_failed", batch_id=ticket.batch_id)
            await _quietly(msg.nak(delay=_RETRY_DELAY_S))
            return
        finally:
            heartbeat.cancel()
        await _quietly(msg.ack())  # only now: the batch's final state is stored

    async def _finished(self, work: asyncio.Task, run: JobRun) -> bool:
        """Wait for the run; False if it stalls (did nothing for `stall_s` outside its lines) first: holding the
        ticket then only keeps every other runner from finishing the batch, which a new claim does in moments."""
        while not work.done():
            await asyncio.wait({work}, timeout=self._heartbeat_s)
            if not work.done() and run.stalled_for() > self._context.stall_s:
                return False
        return True

    async def _sweep_orphans(self) -> None:
        """Queue a ticket again for every batch nobody ever claimed (an api replica died between storing the job
        and queueing its ticket). The job queue deduplicates tickets by batch id, so a batch whose ticket is
        merely waiting behind busy runners gets no second one; every replica may sweep."""
        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                jobs = await self._storage.jobs.list()
                cutoff = time.time() - self._sweep_s
                for job in jobs:
                    if job.status is BatchStatus.VALIDATING and job.runner_id is None and job.created_at < cutoff:
                        if await self._storage.queue.publish(job.id):
                            log.warning("batch.orphan_requeued", batch_id=job.id)
            except BrokerError as exc:  # NATS reconnecting: the next sweep retries
                log.warning("batch.sweep_failed", error=str(exc))


async def _give_up(work: asyncio.Task) -> None:
    """Cancel a run and wait a little for it. A stalled run may not end at once (a cancel can be lost in nats-py,
    see JobRun._stop_watching); left behind, it writes nothing more once a new claim fences it."""
    work.cancel()
    await asyncio.wait({work}, timeout=_GIVE_UP_WAIT_S)
    if not work.done():
        work.add_done_callback(_forget)


def _forget(work: asyncio.Task) -> None:
    if not work.cancelled() and work.exception() is not None:
        log.info("batch.abandoned_run_ended", error=repr(work.exception()))


async def _quietly(action) -> None:
    try:
        await action
    except Exception as exc:
        log.warning("batch.ticket_reply_failed", error=str(exc))
