"""Liveness promises: a silent worker fails the request (never a hang), a client that leaves cancels its
generation, a request whose deadline passed in the queue is dropped unprocessed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from api.auth.caller import ANONYMOUS
from api.auth.request_ids import keyed_request_id
from broker.connection import connect
from broker.journal import JournalFollower
from broker.work_queue import publish_request
from contracts import CancelRequest, GenerateRequest, SamplingParams, parse_event
from tests.integration.harness import ApiServer, WorkerProcess, wait_for_model
from tests.integration.observe import observed

pytestmark = pytest.mark.asyncio
SPARE_MODEL = "tiny-llama-spare"


@pytest.fixture(scope="module")
def spare_settings(base_settings):
    return base_settings.model_copy(update={"served_model_name": SPARE_MODEL, "max_num_seqs": 2})


@pytest.fixture
async def spare_worker(api, spare_settings, tmp_path) -> AsyncIterator[WorkerProcess]:
    """A worker of its own (under another model id), so freezing or killing it disturbs no other test."""
    process = WorkerProcess(spare_settings, tmp_path / "spare.log").start()
    await wait_for_model(api.base_url, SPARE_MODEL, process)
    yield process
    process.stop(signal.SIGKILL)


STREAM_BODY = {"model": SPARE_MODEL, "prompt": "Resume me", "max_tokens": 60, "ignore_eos": True, "temperature": 0}


async def stream_with_fault(
    base_url: str, fault, after_chunks: int = 3, body: dict = STREAM_BODY
) -> tuple[str, dict | None]:
    """Stream STREAM_BODY; call `fault()` after a few chunks; return the text and any error event."""
    text, error, seen = [], None, 0
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                text.append(chunk["choices"][0]["text"])
                seen += 1
                if seen == after_chunks:
                    await fault()
    return "".join(text), error


async def undisturbed_text(base_url: str, body: dict = STREAM_BODY) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        return (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]


async def test_frozen_worker_stream_resumes_where_it_stopped(api, spare_worker) -> None:
    expected = await undisturbed_text(api.base_url)

    async def freeze_then_thaw() -> None:
        os.kill(spare_worker.proc.pid, signal.SIGSTOP)  # alive but silent, like a hung GPU
        await asyncio.sleep(4.5)  # past the edge's 3 s silence timeout: it resubmits with what it delivered
        os.kill(spare_worker.proc.pid, signal.SIGCONT)

    text, error = await stream_with_fault(api.base_url, freeze_then_thaw)
    assert error is None
    assert text == expected


CONSTRAINED_PATTERN = r"[a-z]{30}( [0-9]{3}){12}"
CONSTRAINED_BODY = {
    "model": SPARE_MODEL,
    "prompt": "Resume me",
    "max_tokens": 80,
    "temperature": 0,
    "structured_outputs": {"regex": CONSTRAINED_PATTERN},
}


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
JSON_BODY = {
    "model": SPARE_MODEL,
    "prompt": "Resume me",
    "max_tokens": 300,
    "temperature": 0,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
    },
}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(STREAM_BODY, id="free"),
        pytest.param(CONSTRAINED_BODY, id="constrained"),
        pytest.param(JSON_BODY, id="json_schema"),
    ],
)
async def test_killed_worker_stream_continues_on_a_restarted_worker(
    api, spare_worker, spare_settings, tmp_path, body
) -> None:
    """Constrained: the replacement replays the delivered tokens into a fresh matcher (issue #16)."""
    expected = await undisturbed_text(api.base_url, body)
    replacements: list[WorkerProcess] = []

    async def kill_and_restart() -> None:
        spare_worker.proc.kill()
        replacements.append(WorkerProcess(spare_settings, tmp_path / "replacement.log").start())

    try:
        text, error = await stream_with_fault(api.base_url, kill_and_restart, body=body)
    finally:
        for replacement in replacements:
            replacement.stop(signal.SIGKILL)
    assert error is None
    assert text == expected
    if body is CONSTRAINED_BODY:
        assert re.fullmatch(CONSTRAINED_PATTERN, text), text
    if body is JSON_BODY:
        person = json.loads(text)  # complete, not cut: the grammar ended it, and the resumed matcher agreed
        assert set(person) == {"name", "age", "tags"} and 0 <= person["age"] <= 120, person


async def test_killed_worker_non_streaming_request_completes_on_a_restarted_worker(
    api, nats_server, spare_worker, spare_settings, tmp_path
) -> None:
    expected = await undisturbed_text(api.base_url)
    key = f"liveness-{time.monotonic_ns()}"  # a client-chosen id, so the test knows which journal to watch
    request_id = keyed_request_id("cmpl", key, ANONYMOUS.owner)  # auth is off
    replacement: WorkerProcess | None = None
    async with (
        httpx.AsyncClient(base_url=api.base_url, timeout=120) as http,
        connect(nats_server.url, "liveness-journal") as nc,
    ):
        follower = await JournalFollower(nc.jetstream(), request_id).start()
        answer = asyncio.create_task(http.post("/v1/completions", json=STREAM_BODY, headers={"X-Request-Id": key}))
        try:
            tokens = 0
            while tokens < 3:  # mid-generation: a few tokens are out, the rest are not
                event = await asyncio.wait_for(follower.events.get(), 60)
                tokens += event.kind == "tokens"
            spare_worker.proc.kill()
            replacement = WorkerProcess(spare_settings, tmp_path / "replacement.log").start()
            response = await answer
            attempts = []
            while not follower.events.empty():
                event = follower.events.get_nowait()
                attempts += [event.attempt] if event.kind == "accepted" else []
        finally:
            await follower.close()
            if replacement is not None:
                replacement.stop(signal.SIGKILL)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected
    assert response.json()["usage"]["completion_tokens"] == STREAM_BODY["max_tokens"]
    assert attempts == [2]  # it really was cut off, and resumed on the replacement


async def test_lost_worker_without_replacement_fails_clearly(spare_settings, spare_worker) -> None:
    impatient = ApiServer(spare_settings.model_copy(update={"queue_timeout_s": 3.0})).start()
    try:
        await wait_for_model(impatient.base_url, SPARE_MODEL, spare_worker)

        async def freeze() -> None:
            os.kill(spare_worker.proc.pid, signal.SIGSTOP)

        started = time.monotonic()
        _, error = await stream_with_fault(impatient.base_url, freeze)
        elapsed = time.monotonic() - started
    finally:
        os.kill(spare_worker.proc.pid, signal.SIGCONT)
        impatient.stop()
    assert error is not None and error["code"] == "no_worker"
    assert elapsed < 30  # silence timeout (3 s) + the resubmission's queue timeout (3 s) + the stream so far


async def test_disconnecting_client_publishes_a_cancel(api, nats_server) -> None:
    async with observed(nats_server.url, "inf.cancel.*", CancelRequest.from_bytes) as cancels:
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 480, "stream": True, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        response_id = json.loads(line[len("data: ") :])["id"]
                        break
        cancel = await asyncio.wait_for(cancels.get(), 5)
        assert cancel.request_id == response_id


async def test_non_streaming_client_that_leaves_cancels_too(api, nats_server) -> None:
    async with observed(nats_server.url, "inf.cancel.*", CancelRequest.from_bytes) as cancels:
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 480, "ignore_eos": True, "n": 8}
        async with httpx.AsyncClient(base_url=api.base_url, timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json=body)  # gives up and closes the connection
        cancel = await asyncio.wait_for(cancels.get(), 5)
        assert cancel.request_id.startswith("cmpl-")


def direct_request(prefix: str, **fields) -> GenerateRequest:
    """A request as a direct NATS publisher builds it, replying to `inf.tok.<prefix>.<id>`."""
    request_id = f"{prefix}-{time.monotonic_ns()}"
    return GenerateRequest(
        request_id=request_id,
        model="tiny-llama",
        prompt_token_ids=[1, 2, 3],
        reply_subject=f"inf.tok.{prefix}.{request_id}",
        **fields,
    )


async def test_cancel_frees_the_sequence_within_a_step(api, nats_server, worker) -> None:
    """Straight on NATS, as a direct publisher would: tokens stop right after the cancel."""
    async with (
        connect(nats_server.url, "direct-client") as nc,
        observed(nats_server.url, "inf.tok.direct.*", parse_event) as received,
    ):
        request = direct_request("direct", sampling=SamplingParams(max_tokens=480, ignore_eos=True, temperature=0))
        await publish_request(nc.jetstream(), request)
        tokens_before = 0
        while tokens_before < 3:
            event = await asyncio.wait_for(received.get(), 20)
            if event.kind == "tokens":
                tokens_before += sum(len(choice.token_ids) for choice in event.choices)
        await nc.publish(f"inf.cancel.{request.request_id}", CancelRequest(request_id=request.request_id).to_bytes())
        cancelled_at = time.monotonic()
        finish_reasons = []
        while True:
            event = await asyncio.wait_for(received.get(), 10)
            if event.kind == "tokens":
                finish_reasons += [choice.finish_reason for choice in event.choices if choice.finish_reason]
            if event.kind == "end":
                break
        latency = time.monotonic() - cancelled_at
        assert finish_reasons == ["abort"]
        assert event.usage.completion_tokens < 480
        # The engine checks for aborts between decode steps; a step of this model takes milliseconds.
        assert latency < 2.0, latency


async def test_expired_deadline_is_dropped_unprocessed(api, nats_server) -> None:
    async with (
        connect(nats_server.url, "deadline-client") as nc,
        observed(nats_server.url, "inf.tok.late.*", parse_event) as received,
    ):
        request = direct_request("late", deadline=time.time() - 1)
        await publish_request(nc.jetstream(), request)
        event = await asyncio.wait_for(received.get(), 10)
        assert event.kind == "error" and event.error.code == "deadline_exceeded"
        await asyncio.sleep(0.3)
        assert received.empty()  # no accepted, no tokens
