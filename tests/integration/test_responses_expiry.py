"""Stored responses expire (Settings.response_ttl_s; 30 days by default, as OpenAI keeps them): after the TTL a
response is a 404 everywhere (retrieve, its stream, input_items, previous_response_id), and the server itself has
deleted the record and the event log (KV bucket TTL, max_age on the events stream), so storage stays bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import openai
import pytest

from broker import subjects
from broker.embedded import EmbeddedNatsServer
from broker.topology import ensure_response_storage
from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess, wait_healthy

pytestmark = pytest.mark.asyncio
SIM_MODEL = "sim-expiry"
TTL_S = 4.0


@pytest.fixture
async def expiring(base_settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[ApiServer, str]]:
    """Its own nats-server (the TTL is the bucket's: a short one must not touch other tests' responses), a fast
    sim worker and an api with a TTL of a few seconds."""
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as server:
        settings = base_settings.model_copy(
            update={
                "nats_url": server.url,
                "data_dir": tmp_path / "data",
                "engine": "sim",
                "served_model_name": SIM_MODEL,
                "sim_tokens_per_s": 200.0,
                "batch_runner": False,
                "response_ttl_s": TTL_S,
            }
        )
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        api = ApiServer(settings).start()
        try:
            await wait_healthy(api.base_url, worker)
            yield api, server.url
        finally:
            api.stop()
            worker.stop()


async def _gone_from_nats(nats_url: str, response_id: str, timeout_s: float = 30) -> None:
    """Wait until the server has deleted the record and every logged event of the response."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(subjects.RESPONSES_BUCKET)
        deadline = time.monotonic() + timeout_s
        while True:
            record_left = (await kv.status()).values > 0 and await _has_key(kv, subjects.response_key(response_id))
            info = await js.stream_info(subjects.RESPONSE_EVENTS_STREAM, subjects_filter=">")
            events_left = (info.state.subjects or {}).get(subjects.response_events_subject(response_id), 0)
            if not record_left and not events_left:
                return
            assert time.monotonic() < deadline, f"still stored: record={record_left} events={events_left}"
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _has_key(kv, key: str) -> bool:
    try:
        return bool((await kv.get(key)).value)
    except Exception:  # not found or deleted
        return False


async def test_an_expired_response_is_a_404_and_deleted_from_nats(expiring) -> None:
    api, nats_url = expiring
    client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)
    foreground = await client.responses.create(model=SIM_MODEL, input="Hello", max_output_tokens=4)
    background = await client.responses.create(model=SIM_MODEL, input="Hello", max_output_tokens=4, background=True)
    created = time.monotonic()
    while (await client.responses.retrieve(background.id)).status in ("queued", "in_progress"):
        await asyncio.sleep(0.1)
    # Within the TTL both are there, with an event log for the background one.
    assert (await client.responses.retrieve(foreground.id)).id == foreground.id
    assert [event async for event in await client.responses.retrieve(background.id, stream=True)]
    assert time.monotonic() - created < TTL_S, "too slow to see the responses before they expire"

    await asyncio.sleep(max(0.0, TTL_S - (time.monotonic() - created)) + 0.5)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        for response_id in (foreground.id, background.id):
            for answer in (
                await http.get(f"/v1/responses/{response_id}"),
                await http.get(f"/v1/responses/{response_id}", params={"stream": "true"}),
                await http.get(f"/v1/responses/{response_id}/input_items"),
                await http.post(
                    "/v1/responses",
                    json={"model": SIM_MODEL, "input": "Again", "previous_response_id": response_id},
                ),
            ):
                assert answer.status_code == 404, answer.text
                assert answer.json()["error"]["message"] == f"response {response_id} does not exist"
    # Not only hidden: the server deleted them (the bucket's TTL, the events stream's max_age).
    for response_id in (foreground.id, background.id):
        await _gone_from_nats(nats_url, response_id)


async def test_an_existing_bucket_takes_a_changed_ttl(tmp_path) -> None:
    """A deployment whose bucket was made with another TTL (or none, before expiry existed) converges on the
    setting: otherwise a changed INFERQ_RESPONSE_TTL_S would silently keep the old retention."""
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_response_storage(js, ttl_s=86_400.0)
            await ensure_response_storage(js, ttl_s=60.0)
            for stream in (f"KV_{subjects.RESPONSES_BUCKET}", subjects.RESPONSE_EVENTS_STREAM):
                config = (await js.stream_info(stream)).config
                assert config.max_age == 60.0 and config.duplicate_window <= 60.0, (stream, config)
        finally:
            await nc.close()
