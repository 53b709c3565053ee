"""A background response survives the api replica running it: SIGKILLed mid-generation, another replica takes
the response over (its runner gets the ticket after the ack wait), it completes, and its stream resumed there
from the last event the client had repeats nothing and loses nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from tests.integration.harness import ApiProcess, WorkerProcess, wait_healthy

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
SIM_MODEL = "sim-responses"
TOKENS = 200  # at the sim's 10 tokens/s: twenty seconds of generation, killed a second in


@pytest.fixture
def cluster(base_settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, WorkerProcess]]:
    """Its own nats-server and sim worker: no other test's replica may take this test's ticket."""
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as nats:
        settings = base_settings.model_copy(
            update={
                "nats_url": nats.url,
                "data_dir": tmp_path / "data",
                "engine": "sim",
                "served_model_name": SIM_MODEL,
                "sim_tokens_per_s": 10.0,
                "response_job_ack_wait_s": 3.0,
                "batch_runner": False,
            }
        )
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        try:
            yield settings, worker
        finally:
            worker.stop()


async def _events(http: httpx.AsyncClient, response_id: str, after: int) -> list[dict]:
    answer = await http.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": after})
    return [json.loads(line.removeprefix("data: ")) for line in answer.text.splitlines() if line.startswith("data: ")]


async def test_a_killed_replicas_background_response_completes_elsewhere(cluster, tmp_path) -> None:
    settings, worker = cluster
    first = ApiProcess(settings, tmp_path / "api-1.log").start()
    second = ApiProcess(settings, tmp_path / "api-2.log")
    try:
        await wait_healthy(first.base_url, worker)
        client = openai.AsyncOpenAI(base_url=f"{first.base_url}/v1", api_key="unused", max_retries=0)
        created = await client.responses.create(
            model=SIM_MODEL, input="Tell me a story", background=True, max_output_tokens=TOKENS
        )
        # Follow it on the first replica until some text came, then kill that replica.
        seen: list[dict] = []
        async with httpx.AsyncClient(base_url=first.base_url, timeout=60) as http:
            async with http.stream("GET", f"/v1/responses/{created.id}", params={"stream": "true"}) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line.removeprefix("data: ")))
                    if sum(event["type"] == "response.output_text.delta" for event in seen) >= 5:
                        break
        first.stop()  # SIGKILL: no nak, no goodbye; its ticket goes to the second replica after the ack wait
        second.start()
        await wait_healthy(second.base_url, worker)

        survivor = openai.AsyncOpenAI(base_url=f"{second.base_url}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while (final := await survivor.responses.retrieve(created.id)).status in ("queued", "in_progress"):
            assert time.monotonic() < deadline, "the response was never taken over"
            await asyncio.sleep(0.5)
        assert final.status == "incomplete" and final.usage.output_tokens == TOKENS, final
        async with httpx.AsyncClient(base_url=second.base_url, timeout=60) as http:
            whole = await _events(http, created.id, after=-1)
            resumed = await _events(http, created.id, after=seen[-1]["sequence_number"])
        assert [event["sequence_number"] for event in whole] == list(range(len(whole)))  # no gap, no repeat
        assert whole[: len(seen)] == seen and whole[len(seen) :] == resumed
        text = "".join(event["delta"] for event in whole if event["type"] == "response.output_text.delta")
        assert text and text == final.output_text
        assert whole[-1]["type"] == "response.incomplete"
        assert [event["type"] for event in whole].count("response.in_progress") == 1
        # The second replica took the generation over from the token journal (the worker never stopped).
        assert "request.attached" in (tmp_path / "api-2.log").read_text()
    finally:
        first.stop()
        second.stop()
