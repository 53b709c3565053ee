"""1,000 concurrent SSE streams through one API process, served by one sim worker (no model): every stream gets
status 200, its whole, exact answer (the sim engine is deterministic), numbered `id:` lines and `[DONE]`, with
zero errors, and the service answers normally afterwards. Scaling across sim workers is measured with
`inferq bench` (docs/reliability.md, "Load without a model")."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import structlog

from tests.integration.harness import own_sim_stack

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
log = structlog.get_logger(__name__)

STREAMS = 1_000
SLOTS = 1024  # every stream decodes at once: no queueing in the worker
TOKENS = 8
RATE = 10.0  # tokens/s per sequence: 8 tokens take 0.8 s of sim time; the rest is the edge's work
DEADLINE_S = 60.0
MODEL = "sim"
BODY = {"model": MODEL, "prompt": "w1 w2 w3", "max_tokens": TOKENS, "ignore_eos": True, "seed": 1}


async def test_a_thousand_concurrent_streams_through_one_api_process(base_settings, tmp_path) -> None:
    async with own_sim_stack(
        base_settings,
        tmp_path,
        served_model_name=MODEL,
        sim_tokens_per_s=RATE,
        max_num_seqs=SLOTS,
        queue_max_requests=2 * STREAMS,
        queue_timeout_s=90.0,
        batch_runner=False,
    ) as (settings, worker, api):
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            single = await http.post("/v1/completions", json=BODY)  # the same body, not streamed
        assert single.status_code == 200, single.text
        expected = single.json()["choices"][0]["text"]
        # A client of their own: 1,000 new connections (a kept-alive one could be closed by the server's
        # keep-alive timeout just as a stream reuses it, which says nothing about the edge under load).
        limits = httpx.Limits(max_connections=1100, max_keepalive_connections=1100)
        async with httpx.AsyncClient(base_url=api.base_url, timeout=120, limits=limits) as http:
            start = time.monotonic()
            streams = await asyncio.wait_for(
                asyncio.gather(*(one_stream(http) for _ in range(STREAMS))), timeout=DEADLINE_S + 30
            )
            elapsed = time.monotonic() - start
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            after = await http.post("/v1/completions", json=BODY)

    log.info(
        "sim_load.outcome",
        streams=STREAMS,
        elapsed_s=round(elapsed, 1),
        output_tok_per_s=round(STREAMS * TOKENS / elapsed),
    )
    assert len(expected.split()) == TOKENS, expected
    failures = [s for s in streams if s["error"] or s["status"] != 200 or s["text"] != expected or not s["done"]]
    assert not failures, (len(failures), failures[:3])
    assert len({s["id"] for s in streams}) == STREAMS  # a thousand requests, not one replayed
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == expected


async def one_stream(http: httpx.AsyncClient) -> dict:
    """One SSE stream read line by line: status, response id, text, whether [DONE] came, and any error (an
    error event, a missing or misnumbered `id: <request id>/<index>` line, or a transport error)."""
    result: dict = {"status": None, "id": None, "text": "", "done": False, "error": None}
    event_id: str | None = None
    chunks = 0
    try:
        async with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as response:
            result["status"] = response.status_code
            if response.status_code != 200:
                result["error"] = (await response.aread())[:200].decode(errors="replace")
                return result
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[len("id: ") :]
                elif line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        result["error"] = chunk["error"]
                        continue
                    result["id"] = result["id"] or chunk["id"]
                    if event_id != f"{chunk['id']}/{chunks}" and not result["error"]:
                        result["error"] = f"chunk {chunks} has event id {event_id!r}"
                    event_id = None
                    chunks += 1
                    result["text"] += chunk["choices"][0]["text"]
    except httpx.HTTPError as exc:
        result["error"] = f"{type(exc).__name__}: {exc!r} (from {exc.__context__!r})"
    return result
