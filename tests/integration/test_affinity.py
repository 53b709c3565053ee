"""Affinity routing end to end (docs/routing.md). With two sim workers of one slot each: the turns of a conversation
land on one worker; SIGKILL that worker while a turn streams from it and another request of the conversation waits
on its own subject, and everything is served by the other worker exactly once: the streaming turn resumed, the
waiting request taken over from the dead worker's subject, and the next turn (routed to the dead worker's subject
before the edge saw it go). With two workers of the tiny torch model: the turns land on one worker. Who served what
is read from the token journal (`accepted` events)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from broker import subjects
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.registry import WorkerRegistry
from common.settings import Settings
from contracts import Accepted, parse_event
from tests.integration.harness import ApiServer, WorkerProcess, wait_healthy
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

MODEL = "sim"
SYSTEM = {"role": "system", "content": "You answer in sim tokens."}


@asynccontextmanager
async def two_workers(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple]:
    """NATS, two workers and the API; yields (nats client, http client, worker processes, worker id → pid)."""
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as nats:
        settings = settings.model_copy(update={"nats_url": nats.url, "data_dir": tmp_path / "data"})
        workers = [WorkerProcess(settings, tmp_path / f"worker{i}.log").start() for i in range(2)]
        api = ApiServer(settings).start()
        try:
            async with connect(nats.url, "test") as nc, httpx.AsyncClient(base_url=api.base_url, timeout=90) as http:
                await wait_healthy(api.base_url, workers[0])
                pids = await live_worker_pids(nc, want=2)
                # The edge reads the registry through a short cache: until it lists both, a request would go to the
                # shared queue for want of a choice (a CI run's first turn once did).
                await until(lambda: edge_lists_workers(http, 2), "the edge does not list both workers")
                yield nc, http, workers, pids
        finally:
            api.stop()
            for worker in workers:
                worker.stop()


async def converse(js, http: httpx.AsyncClient, model: str, turns: int) -> tuple[list[dict], list[dict], list]:
    """`turns` turns of one conversation, each sent when the previous answer is in: the messages so far, each
    turn's response body and its `accepted` events."""
    messages = [SYSTEM, {"role": "user", "content": "w1 w2 w3"}]
    bodies, served = [], []
    for turn in range(turns):
        body = await chat(http, messages, max_tokens=3, model=model)
        bodies.append(body)
        served.append(await accepted_by(js, body["id"]))
        messages += [body["choices"][0]["message"], {"role": "user", "content": f"w{turn} w9"}]
    return messages, bodies, served


async def test_a_conversation_stays_on_its_worker_and_survives_its_sigkill(tmp_path: Path) -> None:
    settings = Settings(
        engine="sim",
        served_model_name=MODEL,
        sim_tokens_per_s=10.0,
        max_num_seqs=1,  # a second request of the conversation waits on the worker's own subject
        registry_ttl_s=8.0,  # a killed worker counts as gone (and is taken over) after ~4-5 s; a busy CI box once
        # delayed a live worker's 1 s renewals past a 4 s TTL's 2 s staleness bound, and a turn went elsewhere
        worker_silence_timeout_s=3.0,
        queue_timeout_s=90.0,
        batch_runner=False,
        log_format="json",
    )
    async with two_workers(settings, tmp_path) as (nc, http, workers, pids):
        await run_scenario(nc, http, workers, pids)


async def test_turns_of_a_conversation_land_on_one_worker_of_a_real_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The same routing with the torch engine (tiny model), where a prefix cache makes it pay."""
    settings = Settings(
        model=str(tiny_model_dir),
        served_model_name=TINY_MODEL_NAME,
        dtype="float32",
        device="cpu",
        torch_threads=1,
        max_num_seqs=4,
        batch_runner=False,
        log_format="json",
    )
    async with two_workers(settings, tmp_path) as (nc, http, _, _):
        _, bodies, served = await converse(nc.jetstream(), http, TINY_MODEL_NAME, turns=4)
    owner = served[0][0].worker_id
    assert [[(a.worker_id, a.attempt) for a in events] for events in served] == [[(owner, 1)]] * 4
    assert all(body["usage"]["prompt_tokens"] > bodies[0]["usage"]["prompt_tokens"] for body in bodies[1:])
    # The worker's prefix cache held the earlier turns' prompts: later turns start from their whole 32-token
    # blocks (the first turn's short prompt fills none; the second's fills at least one).
    cached = [body["usage"]["prompt_tokens_details"]["cached_tokens"] for body in bodies]
    assert cached[0] == 0 and all(tokens >= 32 for tokens in cached[2:]), cached


async def run_scenario(nc, http: httpx.AsyncClient, workers: list[WorkerProcess], pids: dict[str, int]) -> None:
    js = nc.jetstream()
    messages, _, served = await converse(js, http, MODEL, turns=4)
    owner = served[0][0].worker_id
    assert [[(a.worker_id, a.attempt) for a in events] for events in served] == [[(owner, 1)]] * 4
    routing = [line for line in (await http.get("/metrics")).text.splitlines() if line.startswith("inferq:affinity")]
    assert 'inferq:affinity_routed_total{model_name="sim"} 4.0' in routing, routing

    # A long turn streams from the owner; meanwhile a second request of the conversation waits on its subject.
    progress: dict = {"id": None, "text": "", "finish_reason": None}
    streaming = asyncio.create_task(stream_chat(http, messages, 40, progress))
    await until(lambda: started(progress), "the long turn did not start")
    waiting = asyncio.create_task(chat(http, messages, max_tokens=4))
    await until(lambda: pending_on(js, owner, 1), "the second request is not waiting on the owner's subject")
    owner_process = next(w for w in workers if w.proc.pid == pids[owner])
    owner_process.stop(signal.SIGKILL)

    # The next turn goes out at once: the edge still lists the owner, so it too waits on the dead owner's subject.
    next_turn = asyncio.create_task(chat(http, [*messages, {"role": "user", "content": "w5"}], max_tokens=4))
    streamed = await asyncio.wait_for(streaming, 60)
    waited, nxt = await asyncio.wait_for(asyncio.gather(waiting, next_turn), 60)
    (survivor,) = set(pids) - {owner}

    assert streamed["finish_reason"] == "length" and len(streamed["text"].split()) == 40, streamed
    stream_events = await accepted_by(js, streamed["id"])
    assert [(a.worker_id, a.attempt) for a in stream_events] == [(owner, 1), (survivor, 2)]  # resumed there
    for body in (waited, nxt):
        assert body["choices"][0]["finish_reason"] == "length"
        # Exactly once: one acceptance in the journal, by the survivor, of the first attempt.
        assert [(a.worker_id, a.attempt) for a in await accepted_by(js, body["id"])] == [(survivor, 1)]
    info = await js.stream_info(subjects.request_stream(MODEL), subjects_filter=subjects.affine_wildcard(MODEL))
    assert not info.state.subjects, info.state.subjects  # nothing left behind on any worker's subject


async def chat(http: httpx.AsyncClient, messages: list[dict], max_tokens: int, model: str = MODEL) -> dict:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "seed": 1},
    )
    assert response.status_code == 200, response.text
    return response.json()


async def stream_chat(http: httpx.AsyncClient, messages: list[dict], max_tokens: int, result: dict) -> dict:
    """The streamed answer, collected into `result` as it comes (so the caller sees the stream start)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            result["id"] = chunk["id"]
            for choice in chunk["choices"]:
                result["text"] += choice["delta"].get("content") or ""
                result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
    return result


async def started(progress: dict) -> bool:
    return bool(progress["text"])


async def pending_on(js, worker_id: str, count: int) -> bool:
    info = await js.consumer_info(subjects.request_stream(MODEL), subjects.affine_consumer(worker_id))
    return info.num_pending == count


async def accepted_by(js, request_id: str) -> list[Accepted]:
    """Every `accepted` event of the request in the token journal, in order (every attempt's). The request is
    over, so the journal already holds all its events: count them, then read that many."""
    info = await js.stream_info(subjects.JOURNAL_STREAM, subjects_filter=subjects.journal_filter(request_id))
    stored = sum((info.state.subjects or {}).values())
    sub = await js.subscribe(subjects.journal_filter(request_id), ordered_consumer=True)
    try:
        events = [parse_event((await sub.next_msg(timeout=5)).data) for _ in range(stored)]
    finally:
        await sub.unsubscribe()
    return [event for event in events if isinstance(event, Accepted)]


async def live_worker_pids(nc, want: int) -> dict[str, int]:
    registry = WorkerRegistry(await nc.jetstream().key_value(subjects.REGISTRY_BUCKET))
    deadline = time.monotonic() + 120
    while True:
        workers = await registry.live_workers()
        if len(workers) == want:
            return {worker.worker_id: worker.pid for worker in workers}
        assert time.monotonic() < deadline, f"{len(workers)} workers registered"
        await asyncio.sleep(0.2)


async def edge_lists_workers(http: httpx.AsyncClient, want: int) -> bool:
    return (await http.get("/health")).json()["workers"] == want


async def until(condition, message: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)
