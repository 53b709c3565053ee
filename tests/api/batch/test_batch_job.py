"""A batch run against a real server (no worker needed): a runner whose claim was taken over is fenced, so
nothing it writes afterwards lands, and its successor finishes the batch from the stored results."""

from __future__ import annotations

import io
import json
import time

import pytest

from api.batch.job import Fenced, JobRun, RunnerContext
from broker.batch_store import BatchStorage
from contracts import BatchJob, BatchStatus, FilePurpose, FileRecord, LineResult

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
    await storage.jobs.create(job.transition(BatchStatus.IN_PROGRESS, now).transition(status, now))
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
