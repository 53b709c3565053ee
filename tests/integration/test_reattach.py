"""Getting a request back after losing it: a client whose API replica is SIGKILLed mid-stream resumes
on another replica with SSE Last-Event-ID; a retried POST with the same Idempotency-Key or X-Request-Id attaches
to the request the first one started, running or finished, instead of generating again. Two API processes, one
sim worker (deterministic text), one nats-server of their own."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.journal import JournalFollower
from common.settings import Settings
from tests.integration.harness import ApiProcess, WorkerProcess, wait_healthy

pytestmark = pytest.mark.asyncio
SIM_MODEL = "sim-reattach"
BODY = {"model": SIM_MODEL, "prompt": "Resume me", "max_tokens": 40, "seed": 3}


@dataclass
class Replicas:
    settings: Settings
    logs: Path
    first: ApiProcess
    second: ApiProcess
    worker: WorkerProcess

    async def start_another(self, name: str) -> ApiProcess:
        api = ApiProcess(self.settings, self.logs / f"{name}.log").start()
        await wait_healthy(api.base_url, self.worker)
        return api


@pytest.fixture(scope="module")
async def replicas(base_settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicas]:
    logs = tmp_path_factory.mktemp("reattach")
    with EmbeddedNatsServer(logs / "nats", port=-1) as nats:
        settings = base_settings.model_copy(
            update={
                "nats_url": nats.url,
                "data_dir": logs / "data",
                "engine": "sim",
                "served_model_name": SIM_MODEL,
                "sim_tokens_per_s": 20.0,
                "batch_runner": False,
            }
        )
        worker = WorkerProcess(settings, logs / "worker.log").start()
        first = ApiProcess(settings, logs / "api-1.log").start()
        second = ApiProcess(settings, logs / "api-2.log").start()
        try:
            for api in (first, second):
                await wait_healthy(api.base_url, worker)
            yield Replicas(settings, logs, first, second, worker)
        finally:
            for api in (first, second):
                api.stop()
            worker.stop(signal.SIGKILL)


@dataclass
class Stream:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finishes: list[str] = field(default_factory=list)
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def read_stream(response: httpx.Response, into: Stream, stop_after: int | None = None) -> Stream:
    """SSE events of a completions stream; returns early (connection still open) after `stop_after` chunks."""
    event_id = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = line[len("id: ") :]
        elif line == "data: [DONE]":
            into.done = True
        elif line.startswith("data: "):
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            into.ids.append(event_id)
            choice = chunk["choices"][0]
            into.texts.append(choice["text"])
            if choice["finish_reason"]:
                into.finishes.append(choice["finish_reason"])
            if stop_after is not None and len(into.ids) == stop_after:
                return into
    return into


async def complete(base_url: str, headers: dict | None = None) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        response = await http.post("/v1/completions", json=BODY, headers=headers or {})
        assert response.status_code == 200, response.text
        return response.json()


async def accepted_attempts(nats_url: str, request_id: str) -> list[int]:
    """The attempts workers accepted for `request_id`, from the token journal: read until an attempt's `end`
    is followed by nothing more."""
    async with connect(nats_url, "test-journal") as nc:
        follower = await JournalFollower(nc.jetstream(), request_id).start()
        attempts, ended = [], False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(follower.events.get(), 2 if ended else 15)
                except TimeoutError:
                    return attempts
                ended = event.kind == "end"
                if event.kind == "accepted":
                    attempts.append(event.attempt)
        finally:
            await follower.close()


async def test_a_stream_resumes_on_another_replica_after_its_replica_is_killed(replicas: Replicas) -> None:
    expected = (await complete(replicas.second.base_url))["choices"][0]["text"]
    doomed = await replicas.start_another("api-doomed")
    before, after = Stream(), Stream()
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{doomed.base_url}/v1/completions", json={**BODY, "stream": True}) as response:
            await read_stream(response, before, stop_after=8)
            doomed.stop(signal.SIGKILL)  # mid-stream: the client's connection dies with it
        last_id = before.ids[-1]
        async with http.stream(
            "POST",
            f"{replicas.second.base_url}/v1/completions",
            json={**BODY, "stream": True},
            headers={"Last-Event-ID": last_id},
        ) as response:
            assert response.status_code == 200
            await read_stream(response, after)
    request_id, index = last_id.rsplit("/", 1)
    assert after.ids[0] == f"{request_id}/{int(index) + 1}"  # continues right after the last chunk it had
    assert before.text + after.text == expected  # nothing lost, nothing repeated
    assert after.finishes == ["length"] and after.done
    assert await accepted_attempts(replicas.settings.nats_url, request_id) == [1]  # the generation went on


async def test_resuming_needs_an_event_id_of_a_known_stream(replicas: Replicas) -> None:
    async with httpx.AsyncClient(base_url=replicas.second.base_url, timeout=30) as http:
        body = {**BODY, "stream": True}
        unknown = await http.post("/v1/completions", json=body, headers={"Last-Event-ID": f"cmpl-{'0' * 32}/3"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        malformed = await http.post("/v1/completions", json=body, headers={"Last-Event-ID": "nonsense"})
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "Last-Event-ID"
        wrong_endpoint = await http.post(
            "/v1/completions", json=body, headers={"Last-Event-ID": f"chatcmpl-{'0' * 32}/3"}
        )
        assert wrong_endpoint.status_code == 400


async def test_a_retried_post_with_the_same_idempotency_key_attaches(replicas: Replicas) -> None:
    headers = {"Idempotency-Key": "order-7781"}
    first = asyncio.create_task(complete(replicas.first.base_url, headers))
    await asyncio.sleep(0.5)  # running on the worker (40 tokens at 20/s take 2 s)
    second = await complete(replicas.second.base_url, headers)  # the retry lands on the other replica
    first = await first
    assert second["id"] == first["id"]
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["usage"]["completion_tokens"] == 40
    late = await complete(replicas.first.base_url, headers)  # after it finished: the stored answer
    assert late["choices"][0]["text"] == first["choices"][0]["text"]
    assert await accepted_attempts(replicas.settings.nats_url, first["id"]) == [1]  # generated once
    other = await complete(replicas.first.base_url, {"Idempotency-Key": "order-7782"})
    assert other["id"] != first["id"]


async def test_chat_completions_attach_by_key_too(replicas: Replicas) -> None:
    body = {"model": SIM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    async with httpx.AsyncClient(timeout=60) as http:
        answers = [
            (
                await http.post(f"{api.base_url}/v1/chat/completions", json=body, headers={"Idempotency-Key": "chat-1"})
            ).json()
            for api in (replicas.first, replicas.second)
        ]
    assert answers[0]["id"] == answers[1]["id"] and answers[0]["id"].startswith("chatcmpl-")
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    assert await accepted_attempts(replicas.settings.nats_url, answers[0]["id"]) == [1]


async def test_a_client_that_drops_and_retries_its_request_id_gets_the_whole_answer(replicas: Replicas) -> None:
    expected = (await complete(replicas.second.base_url))["choices"][0]["text"]
    headers = {"X-Request-Id": "client-chosen-42"}
    dropped, retried = Stream(), Stream()
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{replicas.first.base_url}/v1/completions", json={**BODY, "stream": True}, headers=headers
        ) as response:
            await read_stream(response, dropped, stop_after=5)
        # The connection closed: the first replica cancelled the generation. The retry continues it.
        await asyncio.sleep(0.5)
        async with http.stream(
            "POST", f"{replicas.second.base_url}/v1/completions", json={**BODY, "stream": True}, headers=headers
        ) as response:
            assert response.status_code == 200
            await read_stream(response, retried)
    assert retried.ids[0].endswith("/0")  # no Last-Event-ID: the whole answer, replayed then continued
    assert retried.text == expected
    assert retried.finishes == ["length"] and retried.done
    request_id = retried.ids[0].rsplit("/", 1)[0]
    assert await accepted_attempts(replicas.settings.nats_url, request_id) == [1, 2]  # cancelled, then continued
