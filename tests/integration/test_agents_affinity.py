"""Affinity routing on the agent surfaces (docs/routing.md) end to end, with two sim workers: every turn of a
Responses chain (previous_response_id, one of them a background response run by the response runner) and every turn
of an Anthropic Messages conversation goes to one worker's own subject. Without the conversation key these
surfaces were routed by their prompts' leading tokens, which differ at every turn of a short conversation, so the
turns were spread over both workers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from broker import subjects
from common.settings import Settings
from tests.integration.test_affinity import MODEL, two_workers

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

TURNS = 5  # spread at random over two workers, five turns land on one only once in 16 conversations


async def test_the_turns_of_agent_conversations_land_on_one_worker(tmp_path: Path) -> None:
    settings = Settings(
        engine="sim",
        served_model_name=MODEL,
        sim_tokens_per_s=200.0,
        registry_ttl_s=8.0,  # a busy box's late renewal must not make a live worker look gone (test_affinity.py)
        queue_timeout_s=60.0,
        batch_runner=False,
        log_format="json",
    )
    async with two_workers(settings, tmp_path) as (nc, http, _, pids):
        js = nc.jetstream()
        workers = sorted(pids)
        responses_chain = await served_by(js, workers, responses_turns(http))
        messages_conversation = await served_by(js, workers, messages_turns(http))
    for turns in (responses_chain, messages_conversation):
        assert len(turns) == TURNS and len(set(turns)) == 1 and turns[0] in workers, turns


async def served_by(js, workers: list[str], turns) -> list[str]:
    """The worker whose own subject served each turn of `turns` (an async iterator that yields after each turn):
    read from the workers' own consumers, whose delivered count grows by one for the turn's request."""
    before = await delivered(js, workers)
    served = []
    async for _ in turns:
        after = await delivered(js, workers)
        grown = [worker for worker in workers if after[worker] > before[worker]]
        assert sum(after.values()) - sum(before.values()) == 1, (before, after)  # routed, not the shared queue
        served += grown
        before = after
    return served


async def delivered(js, workers: list[str]) -> dict[str, int]:
    stream = subjects.request_stream(MODEL)
    return {w: (await js.consumer_info(stream, subjects.affine_consumer(w))).delivered.consumer_seq for w in workers}


async def responses_turns(http: httpx.AsyncClient):
    """A previous_response_id chain; its third turn runs in the background (the response runner routes it)."""
    previous = None
    for turn in range(TURNS):
        body = {
            "model": MODEL,
            "instructions": "You answer in sim tokens.",
            "input": f"w{turn} w9",
            "max_output_tokens": 3,
            "previous_response_id": previous,
            "background": turn == 2,
        }
        response = await http.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        previous = response.json()["id"]
        if turn == 2:
            await until_finished(http, previous)
        yield previous


async def messages_turns(http: httpx.AsyncClient):
    """An Anthropic conversation: each turn sends the whole conversation so far."""
    conversation = [{"role": "user", "content": "w1 w2 w3"}]
    for turn in range(TURNS):
        body = {"model": MODEL, "max_tokens": 3, "system": "You answer in sim tokens.", "messages": conversation}
        response = await http.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        conversation += [
            {"role": "assistant", "content": response.json()["content"]},
            {"role": "user", "content": f"w{turn} w9"},
        ]
        yield response.json()["id"]


async def until_finished(http: httpx.AsyncClient, response_id: str, timeout: float = 60.0) -> None:
    """Until the background response is over: `incomplete` when it reached max_output_tokens, as sim answers do."""
    deadline = time.monotonic() + timeout
    while (status := (await http.get(f"/v1/responses/{response_id}")).json()["status"]) != "incomplete":
        assert time.monotonic() < deadline and status in ("queued", "in_progress"), status
        await asyncio.sleep(0.1)
