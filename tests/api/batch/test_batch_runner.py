"""A runner whose batch run hangs outside its lines gives the batch up, so another runner finishes it: a hung
run must not keep heartbeating a ticket nobody else may take (chaos run, seed 22: a batch whose lines were all
done stayed `in_progress` for 5 minutes, until its api stopped; the next runner completed it in 0.15 s)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import pytest

from api.batch.job import JobRun
from api.batch.runner import BatchRunner
from api.services import Services
from broker.batch_store import BatchStorage, JobStore
from broker.kv import Versioned
from common.settings import Settings
from contracts import BatchJob, BatchStatus, BatchTicket
from tests.api.batch.test_batch_job import context, seed_batch

pytestmark = pytest.mark.asyncio


class LanelessEngine:
    """The runner only asks its engine for the batch lane; these runs have no lines left to run."""

    def in_lane(self, lane: object, timeouts: object) -> LanelessEngine:
        return self


@dataclass
class Ticket:
    """The job-queue message as the runner uses it."""

    data: bytes
    replies: list[str] = field(default_factory=list)

    async def in_progress(self) -> None:
        pass

    async def ack(self) -> None:
        self.replies.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.replies.append("nak" if delay is None else f"nak {delay:g}")

    async def term(self) -> None:
        self.replies.append("term")


class HangingFinalize(JobStore):
    """A store whose write of `finalizing` never returns (a NATS call without an answer or a timeout)."""

    def __init__(self, stored: JobStore):
        self.__dict__.update(stored.__dict__)
        self.hung = asyncio.Event()

    async def write(self, record: BatchJob, revision: int) -> Versioned[BatchJob]:
        if record.status is BatchStatus.FINALIZING:
            self.hung.set()
            await asyncio.Event().wait()
        return await super().write(record, revision)


async def test_a_run_that_hangs_after_its_lines_is_given_up_to_another_runner(batch_storage: BatchStorage) -> None:
    await seed_batch(batch_storage, "batch_hang", ["a", "b"], done=["a", "b"], status=BatchStatus.IN_PROGRESS)
    jobs = HangingFinalize(batch_storage.jobs)
    services = Services(settings=Settings(), catalog=None, engine=LanelessEngine())  # type: ignore[arg-type]
    runner = BatchRunner(services, replace(batch_storage, jobs=jobs), nc=None, stall_s=0.5)  # type: ignore[arg-type]
    ticket = Ticket(BatchTicket(batch_id="batch_hang").to_bytes())

    await asyncio.wait_for(runner._handle(ticket), 15)  # before: never returned, heartbeating the ticket
    assert jobs.hung.is_set() and ticket.replies == ["nak"]  # handed back at once, never acked
    stuck = (await batch_storage.jobs.get("batch_hang")).record
    assert stuck.status is BatchStatus.IN_PROGRESS

    await JobRun(context(batch_storage, "successor"), "batch_hang").run()  # the ticket's next runner
    done = (await batch_storage.jobs.get("batch_hang")).record
    assert done.status is BatchStatus.COMPLETED and done.request_counts.completed == 2
    assert (done.runner_id, done.epoch) == ("successor", 2)  # its claim fenced the run that hung
