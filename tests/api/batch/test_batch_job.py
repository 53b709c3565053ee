"""A batch run against a real server (no worker needed): a runner whose claim was taken over is fenced, so
nothing it writes afterwards lands, and its successor finishes the batch from the stored results."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from api.batch.job import Fenced, JobRun, RunnerContext
from broker.batch_store import BatchStorage, ResultStore
from contracts import BatchJob, BatchStatus, FilePurpose, FileRecord, LineResult
from contracts.batch import RequestCounts

pytestmark = pytest.mark.asyncio


def context(storage: BatchStorage, runner_id: str) -> RunnerContext:
    # services stay unused: these runs only assemble stored results
    return RunnerContext(
        services=None,
        storage=storage,
        runner_id=runner_id,
        line_concurrency=2,  # type: ignore[arg-type]
        max_lines=100,
    )


async def seed_batch(
    storage: BatchStorage, batch_id: str, lines: list[str], done: list[str], status: BatchStatus
) -> None:
    """A batch over `lines` that a runner left in `status` with the results of `done` stored."""
    data = "".join(
        json.dumps(
            {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "p"}}
        )
        + "\n"
        for cid in lines
    ).encode()
    await storage.files.put(
        FileRecord(
            id=f"file-{batch_id}", filename="in.jsonl", purpose=FilePurpose.BATCH, bytes=0, created_at=0, owner="o"
        ),
        io.BytesIO(data),
    )
    now = int(time.time())
    job = BatchJob(
        id=batch_id,
        owner="o",
        endpoint="/v1/completions",
        input_file_id=f"file-{batch_id}",
        completion_window="24h",
        created_at=now,
        expires_at=now + 3600,
    )
    job = job.transition(
        BatchStatus.IN_PROGRESS, now, request_counts=RequestCounts(total=len(lines), completed=len(done))
    )
    await storage.jobs.create(job if status is BatchStatus.IN_PROGRESS else job.transition(status, now))
    for cid in done:
        await storage.results.put_once(batch_id, LineResult(custom_id=cid, status_code=200, body={"id": cid}))


async def test_a_runner_whose_claim_was_taken_over_writes_nothing_more(batch_storage: BatchStorage) -> None:
    await seed_batch(batch_storage, "batch_fence", ["a", "b"], done=["a", "b"], status=BatchStatus.FINALIZING)
    zombie = JobRun(context(batch_storage, "zombie"), "batch_fence")
    # The zombie claimed the batch, then went silent long enough for its ticket to go to a successor.
    zombie._held = await batch_storage.jobs.change("batch_fence", lambda job: job.claimed_by("zombie"))
    await JobRun(context(batch_storage, "successor"), "batch_fence").run()
    done = (await batch_storage.jobs.get("batch_fence")).record
    assert done.status is BatchStatus.COMPLETED and (done.runner_id, done.epoch) == ("successor", 2)
    assert done.request_counts.completed == 2 and done.output_file_id and done.error_file_id is None
    with pytest.raises(Fenced):  # the zombie wakes up and tries to record progress
        await zombie._save(lambda job: job.model_copy(update={"error_file_id": "file-zombie"}))
    assert (await batch_storage.jobs.get("batch_fence")).record == done


async def test_a_cancelled_batch_keeps_finished_lines_and_reports_the_rest(batch_storage: BatchStorage) -> None:
    await seed_batch(batch_storage, "batch_cx", ["done", "queued"], done=["done"], status=BatchStatus.CANCELLING)
    await JobRun(context(batch_storage, "r"), "batch_cx").run()
    done = (await batch_storage.jobs.get("batch_cx")).record
    assert done.status is BatchStatus.CANCELLED
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (2, 1, 1)
    errors = io.BytesIO()
    await batch_storage.files.read_into(done.error_file_id, errors)
    [line] = [json.loads(raw) for raw in errors.getvalue().splitlines()]
    assert line["custom_id"] == "queued" and line["error"]["code"] == "batch_cancelled"
    assert await batch_storage.results.get("batch_cx", "done") is None  # purged: the files hold the results now


async def test_a_watcher_whose_cancel_was_lost_does_not_keep_a_finished_batch_running(
    batch_storage: BatchStorage,
) -> None:
    """Chaos run, seed 22: a batch whose 16 lines were all done stayed `in_progress` for 5 minutes, its runner
    silent. The run cancelled its progress watcher after the lines and waited for it; a cancel that meets the
    reply of the watcher's NATS call in the same loop step is lost (Python 3.11's asyncio.wait_for, under every
    nats-py request, returns the reply instead of raising), and the watch loop went on for good. Here the
    watcher's look at the job loses the cancel the same way."""
    await seed_batch(batch_storage, "batch_watch", ["a", "b"], done=["a", "b"], status=BatchStatus.IN_PROGRESS)
    looking = asyncio.Event()

    class LostCancel(JobRun):
        async def _run_lines(self, path: Path) -> None:
            await super()._run_lines(path)
            await looking.wait()  # the lines end while the watcher waits for NATS

        async def _fresh(self):  # only the watcher calls it here (its job shows no new counts)
            fresh = await super()._fresh()
            looking.set()
            try:
                await asyncio.sleep(0.2)  # the reply is in when the cancel comes
            except asyncio.CancelledError:
                pass  # what wait_for does with a cancel that meets a reply
            return fresh

    # Before: never returned (the run waited for a watcher that kept watching).
    await asyncio.wait_for(LostCancel(context(batch_storage, "r"), "batch_watch").run(), 15)
    done = (await batch_storage.jobs.get("batch_watch")).record
    assert done.status is BatchStatus.COMPLETED and done.request_counts.completed == 2


class CountingResults(ResultStore):
    """The batch's result store, counting reads of one line's result (a NATS round trip each)."""

    def __init__(self, stored: ResultStore):
        self.__dict__.update(stored.__dict__)
        self.line_reads = 0

    async def get(self, batch_id: str, custom_id: str) -> LineResult | None:
        self.line_reads += 1
        return await super().get(batch_id, custom_id)


async def test_resuming_and_finishing_a_batch_read_its_results_in_one_pass(batch_storage: BatchStorage) -> None:
    """A 100k-line batch made 100k NATS requests to assemble its files (34 of test_batch_scale's 44 s) and one per
    line done to resume. Here a runner resumes a batch whose lines earlier runs all finished, then assembles it."""
    lines = [f"line {i}" for i in range(600)]
    await seed_batch(batch_storage, "batch_bulk", lines, done=lines, status=BatchStatus.IN_PROGRESS)
    results = CountingResults(batch_storage.results)
    await JobRun(context(replace(batch_storage, results=results), "r"), "batch_bulk").run()
    done = (await batch_storage.jobs.get("batch_bulk")).record
    assert done.status is BatchStatus.COMPLETED and done.request_counts.completed == len(lines)
    output = io.BytesIO()
    await batch_storage.files.read_into(done.output_file_id, output)
    assert [json.loads(raw)["response"]["body"]["id"] for raw in output.getvalue().splitlines()] == lines
    assert results.line_reads == 0  # before: 1200, a read per line to resume and another to assemble
