"""Batch storage against a real server: file contents round-trip through the object store, job writes are
compare-and-swap (one of two racing writers wins), results are create-only, tickets are deduplicated."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from broker import kv as kv_store
from broker import subjects
from broker.batch_store import BatchStorage, FileMissing
from broker.kv import StaleRevision
from contracts import BatchJob, BatchStatus, FilePurpose, FileRecord, LineResult

pytestmark = pytest.mark.asyncio


def job(batch_id: str) -> BatchJob:
    now = int(time.time())
    return BatchJob(
        id=batch_id,
        owner="anonymous",
        endpoint="/v1/completions",
        input_file_id="file-1",
        completion_window="24h",
        created_at=now,
        expires_at=now + 86_400,
    )


async def test_file_contents_round_trip_in_chunks(batch_storage: BatchStorage) -> None:
    data = b"".join(b'{"line": %d}\n' % i for i in range(40_000))  # several object-store chunks
    record = FileRecord(
        id="file-rt", filename="in.jsonl", purpose=FilePurpose.BATCH, bytes=0, created_at=1, owner="anonymous"
    )
    stored = await batch_storage.files.put(record, io.BytesIO(data))
    assert stored.bytes == len(data) and (await batch_storage.files.get("file-rt")) == stored
    target = io.BytesIO()
    await batch_storage.files.read_into("file-rt", target)
    assert target.getvalue() == data
    assert "file-rt" in [item.id for item in await batch_storage.files.list()]
    assert await batch_storage.files.delete("file-rt") and not await batch_storage.files.delete("file-rt")
    assert await batch_storage.files.get("file-rt") is None
    with pytest.raises(FileMissing):
        await batch_storage.files.read_into("file-rt", io.BytesIO())


async def test_job_writes_are_compare_and_swap(batch_storage: BatchStorage) -> None:
    created = await batch_storage.jobs.create(job("batch_cas"))
    runner_a = created.record.claimed_by("a")
    runner_b = created.record.claimed_by("b")
    won = await batch_storage.jobs.write(runner_a, created.revision)
    with pytest.raises(StaleRevision):  # b read the same revision: it loses
        await batch_storage.jobs.write(runner_b, created.revision)
    assert (await batch_storage.jobs.get("batch_cas")).record.runner_id == "a"
    cancelled = await batch_storage.jobs.change("batch_cas", lambda j: j.transition(BatchStatus.CANCELLING, 5))
    assert cancelled.revision > won.revision and cancelled.record.runner_id == "a"  # the edit kept the claim
    assert cancelled.record.status is BatchStatus.CANCELLING and cancelled.record.cancelling_at == 5


async def test_results_are_stored_once_and_purged_per_batch(batch_storage: BatchStorage) -> None:
    first = LineResult(custom_id="x/1 ü", status_code=200, body={"n": 1})
    assert await batch_storage.results.put_once("batch_r", first)
    assert not await batch_storage.results.put_once("batch_r", first.model_copy(update={"body": {"n": 2}}))
    assert (await batch_storage.results.get("batch_r", "x/1 ü")).body == {"n": 1}  # the first result stands
    await batch_storage.results.put_once("batch_other", first)
    await batch_storage.results.purge("batch_r")
    assert await batch_storage.results.get("batch_r", "x/1 ü") is None
    assert await batch_storage.results.get("batch_other", "x/1 ü") is not None


async def test_lost_runs_are_counted_per_line_by_every_runner_and_purged_with_the_results(
    batch_storage: BatchStorage,
) -> None:
    results = batch_storage.results
    assert await results.count_loss("batch_l", "x/1 ü") == 1
    # Two runners of the batch (one presumed dead) counting at once: compare-and-swap loses neither count.
    assert sorted(await asyncio.gather(*(results.count_loss("batch_l", "x/1 ü") for _ in range(4)))) == [2, 3, 4, 5]
    assert await results.count_loss("batch_l", "other") == 1
    assert await results.count_loss("batch_other", "x/1 ü") == 1
    await results.purge("batch_l")
    assert await results.count_loss("batch_l", "x/1 ü") == 1  # a new count
    assert await results.count_loss("batch_other", "x/1 ü") == 2


async def test_one_ticket_per_batch(batch_storage: BatchStorage) -> None:
    await batch_storage.queue.publish("batch_t")
    await batch_storage.queue.publish("batch_t")  # a retried create
    msg = await batch_storage.queue.fetch(timeout=1)
    assert msg is not None and b"batch_t" in msg.data
    await msg.ack()
    assert await batch_storage.queue.fetch(timeout=0.3) is None
    await batch_storage.queue.stop()


async def test_listing_sees_every_job_while_one_is_being_saved(batch_storage: BatchStorage) -> None:
    # A running batch saves its progress every second; a listing taken meanwhile must still hold every batch
    # (nats-py's watcher can say "caught up" early while a key is written during its replay).
    ids = [f"batch_list{i}" for i in range(6)]
    for batch_id in ids:
        await batch_storage.jobs.create(job(batch_id))
    busy = await batch_storage.jobs.get(ids[0])

    async def keep_saving() -> None:
        nonlocal busy
        while True:
            busy = await batch_storage.jobs.write(busy.record, busy.revision)
            await asyncio.sleep(0.001)

    saving = asyncio.create_task(keep_saving())
    try:
        for _ in range(150):
            listed = {item.id for item in await batch_storage.jobs.list()}
            assert set(ids) <= listed
    finally:
        saving.cancel()


async def test_a_batchs_results_are_read_back_in_one_pass(batch_storage: BatchStorage) -> None:
    results, kv = batch_storage.results, batch_storage.results._kv
    stream = f"KV_{subjects.BATCH_RESULTS_BUCKET}"
    consumers_before = (await kv._js.stream_info(stream)).state.consumer_count
    lines = [f"line {i}" for i in range(1_000)]  # several chunks
    await asyncio.gather(
        *(results.put_once("batch_scan", LineResult(custom_id=cid, status_code=200, body={"n": cid})) for cid in lines)
    )
    await results.count_loss("batch_scan", "line 1")  # a loss count beside a result: not a result
    await results.count_loss("batch_scan", "never stored")
    await results.put_once("batch_scan_other", LineResult(custom_id="line 2", status_code=200, body={"n": "other"}))
    # A key written twice (create-only in the store, but a bucket may hold history): the newest value counts.
    rewritten = LineResult(custom_id="line 3", status_code=500, body={"n": "newer"})
    await kv.put(subjects.batch_result_key("batch_scan", "line 3"), rewritten.to_bytes())
    await kv.delete(subjects.batch_result_key("batch_scan", "line 4"))  # a deleted key has no result

    stored = {key: LineResult.from_bytes(value) async for chunk in results.stored("batch_scan") for key, value in chunk}

    expected = {subjects.batch_result_key("batch_scan", cid): cid for cid in lines if cid != "line 4"}
    assert {key: result.custom_id for key, result in stored.items()} == expected
    assert stored[subjects.batch_result_key("batch_scan", "line 3")] == rewritten
    assert stored[subjects.batch_result_key("batch_scan", "line 9")].body == {"n": "line 9"}
    assert [chunk async for chunk in results.stored("batch_nothing")] == []
    assert (await kv._js.stream_info(stream)).state.consumer_count == consumers_before  # the passes left none


async def test_results_the_pass_misses_are_read_one_by_one(
    batch_storage: BatchStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass whose consumer sits on a replica still catching up sees fewer results than the stream holds; the
    leader's listing of the keys catches what it missed, or those lines would be written as never run."""
    results = batch_storage.results
    lines = [f"line {i}" for i in range(40)]
    for cid in lines:
        await results.put_once("batch_lag", LineResult(custom_id=cid, status_code=200, body={"n": cid}))
    scan = kv_store._scan

    async def lagging(kv, pattern, chunk):  # a consumer that never delivers the last ten stored results
        async for messages in scan(kv, pattern, chunk):
            yield [msg for msg in messages if not msg.subject.endswith(tuple(_digests(lines[30:])))]

    monkeypatch.setattr(kv_store, "_scan", lagging)

    stored = {key for chunk in [c async for c in results.stored("batch_lag")] for key, _ in chunk}

    assert stored == {subjects.batch_result_key("batch_lag", cid) for cid in lines}


def _digests(custom_ids: list[str]) -> list[str]:
    return [subjects.batch_result_digest(cid) for cid in custom_ids]
