"""The Files and Batch APIs with the real openai SDK against real processes: results equal the synchronous
endpoints', per-line problems land in the error file, cancel keeps finished results, listings page, and a batch
whose runner and worker are SIGKILLed mid-job ends with exactly one line per input line."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from tests.integration.harness import ApiProcess, WorkerProcess, wait_healthy
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
FINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def client(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)


def completion_line(custom_id: str, prompt: str, max_tokens: int = 6, model: str = TINY_MODEL_NAME) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    }


def jsonl(lines: list[dict | str]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


async def start_batch(client: openai.AsyncOpenAI, lines: list[dict | str], endpoint: str = "/v1/completions"):
    upload = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")


async def wait_final(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout  # a hang guard, not an assertion about speed
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        await asyncio.sleep(0.2)


async def read_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.content.decode().splitlines()]


async def test_completions_batch_equals_the_synchronous_endpoint(client) -> None:
    prompts = {"a": "The capital of France is", "b": "Once upon a time", "c": "1, 2, 3,"}
    batch = await start_batch(client, [completion_line(custom_id, prompt) for custom_id, prompt in prompts.items()])
    assert batch.status == "validating" and batch.endpoint == "/v1/completions"
    done = await wait_final(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.usage.output_tokens == 18
    outputs = {line["custom_id"]: line for line in await read_lines(client, done.output_file_id)}
    assert set(outputs) == set(prompts)
    for custom_id, prompt in prompts.items():
        direct = await client.completions.create(
            model=TINY_MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        line = outputs[custom_id]
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "text_completion" and line["response"]["request_id"] == body["id"]
        assert body["choices"][0]["text"] == direct.choices[0].text
    with pytest.raises(openai.BadRequestError, match="completed"):  # no way back from a final state
        await client.batches.cancel(batch.id)


async def test_chat_batch_answers_like_chat_completions(client) -> None:
    body = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 5,
        "temperature": 0,
    }
    batch = await start_batch(
        client,
        [{"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": body}],
        endpoint="/v1/chat/completions",
    )
    done = await wait_final(client, batch.id)
    [line] = await read_lines(client, done.output_file_id)
    direct = await client.chat.completions.create(**body)
    assert line["response"]["body"]["object"] == "chat.completion"
    assert line["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content


async def test_embeddings_batch_answers_like_embeddings(client) -> None:
    body = {"model": TINY_MODEL_NAME, "input": ["alpha", "beta"]}
    batch = await start_batch(
        client, [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": body}], endpoint="/v1/embeddings"
    )
    done = await wait_final(client, batch.id)
    [line] = await read_lines(client, done.output_file_id)
    direct = await client.embeddings.create(**body)
    vectors = [item["embedding"] for item in line["response"]["body"]["data"]]
    assert len(vectors) == 2
    for batched, item in zip(vectors, direct.data, strict=True):
        assert batched == pytest.approx(item.embedding, abs=1e-5)


async def test_bad_lines_are_reported_in_the_error_file_not_fatal(client) -> None:
    lines = [
        completion_line("good", "Hello"),
        "{not json",
        {**completion_line("wrong-url", "Hello"), "url": "/v1/chat/completions"},
        completion_line("no-model", "Hello", model="no-such-model"),
        completion_line("good", "Hello again"),  # duplicate custom_id
        {"method": "POST", "url": "/v1/completions", "body": {"model": TINY_MODEL_NAME, "prompt": "x"}},
        completion_line("bad-body", "Hello", max_tokens=-3),
    ]
    done = await wait_final(client, (await start_batch(client, lines)).id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 1, 6)
    [good] = await read_lines(client, done.output_file_id)
    assert good["custom_id"] == "good"
    errors = await read_lines(client, done.error_file_id)
    codes = sorted(line["error"]["code"] for line in errors)
    assert codes == sorted(
        [
            "invalid_json",
            "invalid_url",
            "model_not_found",
            "duplicate_custom_id",
            "missing_custom_id",
            "invalid_request",
        ]
    )
    # Lines that reached the endpoint carry its answer, with the status HTTP would have had; the rest never ran.
    statuses = {line["custom_id"]: line["response"] and line["response"]["status_code"] for line in errors}
    assert statuses == {None: None, "wrong-url": None, "good": None, "no-model": 404, "bad-body": 400}


async def test_cancel_stops_queued_lines_and_keeps_finished_results(client) -> None:
    lines = long_lines(40)
    batch = await start_batch(client, lines)
    while (await client.batches.retrieve(batch.id)).request_counts.completed < 1:  # progress is visible
        await asyncio.sleep(0.1)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await wait_final(client, batch.id)
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    finished = await read_lines(client, done.output_file_id)
    stopped = await read_lines(client, done.error_file_id)
    assert len(finished) == done.request_counts.completed >= 1
    assert len(stopped) == done.request_counts.failed >= 1
    assert {line["error"]["code"] for line in stopped} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in finished + stopped) == sorted(line["custom_id"] for line in lines)
    assert (await client.batches.cancel(batch.id)).status == "cancelled"  # asking again is harmless


async def test_an_expired_window_keeps_finished_lines_and_reports_the_rest(client) -> None:
    lines = long_lines(40)
    upload = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="3s")
    assert batch.expires_at == batch.created_at + 3
    done = await wait_final(client, batch.id)
    assert done.status == "expired" and done.expired_at
    finished = await read_lines(client, done.output_file_id)
    unfinished = await read_lines(client, done.error_file_id)
    assert len(finished) == done.request_counts.completed and len(unfinished) == done.request_counts.failed >= 1
    assert {line["error"]["code"] for line in unfinished} == {"batch_expired"}
    assert sorted(line["custom_id"] for line in finished + unfinished) == sorted(line["custom_id"] for line in lines)


def long_lines(count: int) -> list[dict]:
    """Lines that take long enough together (tens of seconds) that a cancel or a short window lands mid-batch."""
    return [completion_line(f"line-{i}", f"Story number {i}:", max_tokens=400) for i in range(count)]


async def test_batches_list_newest_first_with_cursor_pagination(client) -> None:
    created = [(await start_batch(client, [completion_line("only", "Hi", max_tokens=1)])).id for _ in range(3)]
    first = await client.batches.list(limit=2)
    assert [batch.id for batch in first.data] == created[::-1][:2] and first.has_more
    second = await client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == created[0]
    every = [batch.id async for batch in client.batches.list(limit=2)]  # the SDK follows the cursor
    assert every[:3] == created[::-1] and len(every) == len(set(every))
    for batch_id in created:
        await wait_final(client, batch_id)


async def test_files_round_trip_and_refusals(client, api) -> None:
    data = jsonl([completion_line("x", "Hi")])
    upload = await client.files.create(file=("mine.jsonl", data), purpose="batch")
    assert (upload.bytes, upload.filename, upload.purpose) == (len(data), "mine.jsonl", "batch")
    assert (await client.files.retrieve(upload.id)).id == upload.id
    assert (await client.files.content(upload.id)).content == data
    assert upload.id in [item.id async for item in client.files.list(purpose="batch")]
    assert (await client.files.delete(upload.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(upload.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("x.jsonl", data), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        await client.batches.create(input_file_id="file-x", endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")


async def test_an_upload_over_the_size_limit_is_a_clear_413(base_settings, worker) -> None:
    from tests.integration.harness import ApiServer

    small = ApiServer(base_settings.model_copy(update={"max_file_bytes": 1000, "batch_runner": False})).start()
    try:
        upload = httpx.Request("POST", "/", data={"purpose": "batch"}, files={"file": ("big.jsonl", b"x" * 5000)})
        body, content_type = upload.read(), upload.headers["content-type"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: only the upload's real size can tell
            yield body[:100]
            yield body[100:]

        async with httpx.AsyncClient(base_url=small.base_url) as http:
            for content in (body, chunked()):
                response = await http.post("/v1/files", content=content, headers={"content-type": content_type})
                assert response.status_code == 413
                assert "1000 bytes" in response.json()["error"]["message"]
    finally:
        small.stop()


async def test_a_batch_whose_ticket_was_never_queued_is_swept_up_and_run(base_settings, worker, nats_server) -> None:
    """An api replica that dies between storing a job and queueing its ticket leaves the job validating with
    nobody to run it: a runner's orphan sweep queues the ticket again (once)."""
    from api.batch.records import new_object_id
    from broker.batch_store import BatchStorage
    from contracts import BatchJob
    from tests.integration.harness import ApiServer

    sweeper = ApiServer(base_settings.model_copy(update={"batch_orphan_sweep_s": 1.0})).start()
    try:
        client = openai.AsyncOpenAI(base_url=f"{sweeper.base_url}/v1", api_key="unused", max_retries=0)
        lines = [completion_line(f"o{i}", f"orphan {i}") for i in range(3)]
        upload = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
        now = int(time.time())
        orphan = BatchJob(
            id=new_object_id("batch_"),
            owner="anonymous",
            endpoint="/v1/completions",
            input_file_id=upload.id,
            completion_window="24h",
            created_at=now,
            expires_at=now + 86_400,
        )
        async with connect(nats_server.url, "dying-replica") as nc:
            storage = await BatchStorage.open(nc.jetstream(), base_settings.batch_job_ack_wait_s)
            await storage.jobs.create(orphan)  # ... and the replica dies before queueing the ticket
            batch = await wait_final(client, orphan.id, timeout=60)
            assert batch.status == "completed" and batch.request_counts.completed == 3
            assert not await storage.queue.publish(orphan.id)  # the sweep's ticket holds the id: no second one
        assert len(await read_lines(client, batch.output_file_id)) == 3
    finally:
        sweeper.stop()


# --- crash recovery ---------------------------------------------------------------------------------------------

LONG = 240  # tokens per line in the crash test


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A server of its own: no other runner can take this test's batch, and the kills disturb nothing else."""
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as server:
        yield server


@pytest.fixture
async def crash_settings(base_settings, own_nats, tmp_path: Path) -> AsyncIterator[Settings]:
    yield base_settings.model_copy(
        update={
            "nats_url": own_nats.url,
            "data_dir": tmp_path / "data",
            "batch_job_ack_wait_s": 3.0,
            "batch_line_concurrency": 2,
            "max_num_seqs": 2,
        }
    )


async def test_killed_runner_and_worker_still_give_one_line_per_input_line(crash_settings, tmp_path) -> None:
    processes: list[WorkerProcess | ApiProcess] = []

    async def boot() -> ApiProcess:
        worker = WorkerProcess(crash_settings, tmp_path / "worker.log").start()
        api = ApiProcess(crash_settings, tmp_path / "api.log").start()
        processes.extend([worker, api])
        await wait_healthy(api.base_url, worker)
        return api

    try:
        api = await boot()
        client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)
        # Long enough (8 rounds of 2 lines) that the first progress report comes well before the end.
        prompts = {f"line-{i}": f"Count with me: {i}," for i in range(16)}
        batch = await start_batch(
            client, [completion_line(cid, prompt, max_tokens=LONG) for cid, prompt in prompts.items()]
        )
        while (before := await client.batches.retrieve(batch.id)).request_counts.completed < 2:
            await asyncio.sleep(0.1)
        assert before.status == "in_progress" and before.request_counts.completed < 16  # really mid-job
        for process in processes:  # runner and worker die mid-job, with lines in flight
            process.stop(signal.SIGKILL)
        api = await boot()
        client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)
        done = await wait_final(client, batch.id, timeout=180)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (16, 16, 0)
        assert await read_lines(client, done.error_file_id) == []
        outputs = await read_lines(client, done.output_file_id)
        assert sorted(line["custom_id"] for line in outputs) == sorted(prompts)  # exactly one line each
        # Each line's undisturbed answer, two running and two waiting at a time (the worker has two slots, as the
        # batch's lines had; more would wait in the queue towards its timeout), rather than one after another.
        in_flight = asyncio.Semaphore(4)

        async def direct(prompt: str) -> str:
            async with in_flight:
                answer = await client.completions.create(
                    model=TINY_MODEL_NAME,
                    prompt=prompt,
                    max_tokens=LONG,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
            return answer.choices[0].text

        texts = await asyncio.gather(*(direct(prompts[line["custom_id"]]) for line in outputs))
        for line, text in zip(outputs, texts, strict=True):
            assert line["response"]["body"]["choices"][0]["text"] == text
    finally:
        for process in processes:
            process.stop(signal.SIGKILL)
