"""A keyed chat whose last attempt lost token events in the journal (a NATS node failure: chaos run, seed 2026,
10 minutes) and has used every attempt: a retried POST with the same Idempotency-Key gets the whole answer,
continued by a worker on a new attempt of the same request, instead of 503 `worker_lost` on every retry until the
journal forgets the key. A Last-Event-ID resume of it, whose client holds text, still gets the clear error.

The hole is exact because the test writes the broken request's journal itself (the events of an undisturbed run
of the same body, moved to attempt 3, one event left out); the continuation comes from a real sim worker, whose
tokens are a function of (seed, position), so the answer must equal the undisturbed one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from api.auth.caller import ANONYMOUS
from api.auth.request_ids import keyed_request_id
from broker.connection import connect
from broker.events import Event
from broker.journal import JournalFollower
from common.settings import Settings
from contracts import Accepted
from tests.integration.harness import own_sim_stack

pytestmark = pytest.mark.asyncio
SIM_MODEL = "sim-journal-hole"
BODY = {"model": SIM_MODEL, "messages": [{"role": "user", "content": "Mind the gap"}], "max_tokens": 12, "seed": 9}
LOST_WORKER = "worker-that-went-away"


@pytest.fixture(scope="module")
async def stack(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple]:
    tmp_path = tmp_path_factory.mktemp("journal-hole")
    overrides = {"served_model_name": SIM_MODEL, "sim_tokens_per_s": 100.0, "batch_runner": False}
    async with own_sim_stack(base_settings, tmp_path, **overrides) as (settings, _, api):
        yield settings, api


async def journal(nats_url: str, request_id: str, *, until_quiet_s: float | None = None) -> list[Event]:
    """The request's journaled events: up to its first `end`, or (`until_quiet_s`) until nothing more comes."""
    async with connect(nats_url, "test-journal-hole") as nc:
        follower = await JournalFollower(nc.jetstream(), request_id).start()
        events: list[Event] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(follower.events.get(), until_quiet_s or 15)
                except TimeoutError:
                    if until_quiet_s is None:
                        raise
                    return events
                events.append(event)
                if event.kind == "end" and until_quiet_s is None:
                    return events
        finally:
            await follower.close()


async def write_broken_journal(nats_url: str, request_id: str, undisturbed: list[Event]) -> None:
    """Attempts 1 and 2 accepted and went silent; attempt 3 streamed the undisturbed tokens but its second token
    event never reached the journal, then ended."""
    token_events = [event for event in undisturbed if event.kind == "tokens"]
    assert len(token_events) >= 3, "the hole needs a token event on each side"
    attempt_3 = [Accepted(request_id=request_id, attempt=3, seq=0, worker_id=LOST_WORKER)]
    for event in [*token_events, next(event for event in undisturbed if event.kind == "end")]:
        attempt_3.append(event.model_copy(update={"request_id": request_id, "attempt": 3, "seq": len(attempt_3)}))
    del attempt_3[2]  # the hole
    events = [Accepted(request_id=request_id, attempt=a, seq=0, worker_id=LOST_WORKER) for a in (1, 2)] + attempt_3
    async with connect(nats_url, "test-journal-writer") as nc:
        js = nc.jetstream()
        for event in events:
            await js.publish(f"inf.tok.lost-edge.{request_id}", event.to_bytes())


async def key_with_a_hole(http: httpx.AsyncClient, nats_url: str, key: str) -> tuple[dict, list, str]:
    """An undisturbed answer to BODY, its journal, and the request id of `key`, whose journal now holds three
    attempts of that answer with a hole in the last (written as a lost worker would have left it)."""
    reference = (await http.post("/v1/chat/completions", json=BODY)).json()
    undisturbed = await journal(nats_url, reference["id"])
    broken = keyed_request_id("chatcmpl", key, ANONYMOUS.owner)
    await write_broken_journal(nats_url, broken, undisturbed)
    return reference, undisturbed, broken


async def test_a_retried_post_continues_a_key_whose_last_attempt_has_a_hole(stack: tuple) -> None:
    settings, api = stack
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        reference, undisturbed, broken = await key_with_a_hole(http, settings.nats_url, "stuck-key")

        retried = await http.post("/v1/chat/completions", json=BODY, headers={"Idempotency-Key": "stuck-key"})
        assert retried.status_code == 200, retried.text  # before: 503 worker_lost, on every retry
        answer = retried.json()
        assert answer["id"] == broken
        assert answer["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == BODY["max_tokens"]
        events = await journal(settings.nats_url, broken, until_quiet_s=2)
        real = [(e.attempt, e.resumed_tokens) for e in events if e.kind == "accepted" and e.worker_id != LOST_WORKER]
        before_the_hole = len(next(e for e in undisturbed if e.kind == "tokens").choices[0].token_ids)
        assert real == [(4, before_the_hole)]  # one new attempt, continuing from the tokens before the hole

        again = await http.post("/v1/chat/completions", json=BODY, headers={"Idempotency-Key": "stuck-key"})
        assert again.json()["choices"][0]["message"] == answer["choices"][0]["message"]  # attaches, no attempt 5
        events = await journal(settings.nats_url, broken, until_quiet_s=2)
        assert [e.attempt for e in events if e.kind == "accepted" and e.worker_id != LOST_WORKER] == [4]


async def test_a_last_event_id_resume_of_that_key_still_gets_the_clear_error(stack: tuple) -> None:
    settings, api = stack
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        _, _, broken = await key_with_a_hole(http, settings.nats_url, "resumed-key")
        chunks = []
        async with http.stream(
            "POST", "/v1/chat/completions", json={**BODY, "stream": True}, headers={"Last-Event-ID": f"{broken}/1"}
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[len("data: ") :]))
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    assert [error["code"] for error in errors] == ["worker_lost"], chunks
    events = await journal(settings.nats_url, broken, until_quiet_s=2)
    assert all(e.worker_id == LOST_WORKER for e in events if e.kind == "accepted")  # nothing generated again
