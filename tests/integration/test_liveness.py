"""Liveness promises: a silent worker fails the request (never a hang), a client that leaves cancels its
generation, a request whose deadline passed in the queue is dropped unprocessed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from broker.connection import connect
from broker.work_queue import publish_request
from contracts import CancelRequest, GenerateRequest, SamplingParams, parse_event
from tests.integration.harness import WorkerProcess, wait_healthy

pytestmark = pytest.mark.asyncio
SPARE_MODEL = "tiny-llama-spare"


@pytest.fixture(scope="module")
def spare_worker(base_settings, tmp_path_factory) -> Iterator[WorkerProcess]:
    """A worker of its own (under another model id), so freezing it does not disturb other tests."""
    settings = base_settings.model_copy(update={"served_model_name": SPARE_MODEL, "max_num_seqs": 2})
    process = WorkerProcess(settings, tmp_path_factory.mktemp("spare") / "worker.log").start()
    yield process
    process.stop()


async def test_frozen_worker_fails_the_stream_with_a_clear_error(api, spare_worker) -> None:
    await wait_healthy(api.base_url, spare_worker)
    for _ in range(100):  # the catalog caches the registry briefly
        async with httpx.AsyncClient(base_url=api.base_url) as http:
            if SPARE_MODEL in (await http.get("/health")).json()["models"]:
                break
        await asyncio.sleep(0.1)
    body = {"model": SPARE_MODEL, "prompt": "hello", "max_tokens": 400, "stream": True, "ignore_eos": True,
            "temperature": 0}
    lines: list[str] = []
    started = None
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 2:
                    os.kill(spare_worker.proc.pid, signal.SIGSTOP)  # alive but silent, like a hung GPU
                    started = time.monotonic()
    elapsed = time.monotonic() - started
    os.kill(spare_worker.proc.pid, signal.SIGCONT)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == "worker_lost"
    assert 2.5 <= elapsed < 10, elapsed  # the edge's silence timeout is 3 s


async def test_disconnecting_client_publishes_a_cancel(api, nats_server) -> None:
    async with connect(nats_server.url, "observer") as nc:
        cancels: asyncio.Queue = asyncio.Queue()

        async def on_cancel(msg) -> None:
            await cancels.put(CancelRequest.from_bytes(msg.data))

        await nc.subscribe("inf.cancel.*", cb=on_cancel)
        await nc.flush()
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 480, "stream": True, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        response_id = json.loads(line[len("data: "):])["id"]
                        break
        cancel = await asyncio.wait_for(cancels.get(), 5)
        assert cancel.request_id == response_id


async def test_non_streaming_client_that_leaves_cancels_too(api, nats_server) -> None:
    async with connect(nats_server.url, "observer-2") as nc:
        cancels: asyncio.Queue = asyncio.Queue()

        async def on_cancel(msg) -> None:
            await cancels.put(CancelRequest.from_bytes(msg.data))

        await nc.subscribe("inf.cancel.*", cb=on_cancel)
        await nc.flush()
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 480, "ignore_eos": True, "n": 8}
        async with httpx.AsyncClient(base_url=api.base_url, timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json=body)  # gives up and closes the connection
        cancel = await asyncio.wait_for(cancels.get(), 5)
        assert cancel.request_id.startswith("cmpl-")


async def test_cancel_frees_the_sequence_within_a_step(api, nats_server, worker) -> None:
    """Straight on NATS, as a direct publisher would: tokens stop right after the cancel."""
    async with connect(nats_server.url, "direct-client") as nc:
        received: asyncio.Queue = asyncio.Queue()

        async def on_event(msg) -> None:
            await received.put(parse_event(msg.data))

        await nc.subscribe("inf.tok.direct.*", cb=on_event)
        request = GenerateRequest(request_id=f"direct-{time.monotonic_ns()}", model="tiny-llama",
                                  prompt_token_ids=[1, 2, 3], reply_subject="inf.tok.direct.x",
                                  sampling=SamplingParams(max_tokens=480, ignore_eos=True, temperature=0))
        request = request.model_copy(update={"reply_subject": f"inf.tok.direct.{request.request_id}"})
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
    async with connect(nats_server.url, "deadline-client") as nc:
        received: asyncio.Queue = asyncio.Queue()

        async def on_event(msg) -> None:
            await received.put(parse_event(msg.data))

        await nc.subscribe("inf.tok.late.*", cb=on_event)
        request = GenerateRequest(request_id=f"late-{time.monotonic_ns()}", model="tiny-llama",
                                  prompt_token_ids=[1, 2, 3], reply_subject="inf.tok.late.x",
                                  deadline=time.time() - 1)
        request = request.model_copy(update={"reply_subject": f"inf.tok.late.{request.request_id}"})
        await publish_request(nc.jetstream(), request)
        event = await asyncio.wait_for(received.get(), 10)
        assert event.kind == "error" and event.error.code == "deadline_exceeded"
        await asyncio.sleep(0.3)
        assert received.empty()  # no accepted, no tokens
