"""`--background-batch N`: a batch job of N completion lines running while a level is measured, to show what a
big batch costs interactive traffic (the batch lane should leave TTFT close to the idle value)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import structlog

from ops.bench.config import BenchConfig, BenchError
from ops.bench.prompts import prompt_token_ids

log = structlog.get_logger(__name__)

_FINAL = {"completed", "failed", "expired", "cancelled"}
_POLL_S = 0.5
_START_TIMEOUT_S = 300.0  # validation of a big file and the first line on a slow model


@dataclass(slots=True)
class BatchProgress:
    """How many background lines finished while the level ran: a starved batch would show zero."""

    lines: int
    completed_during_level: int = 0


def batch_input(cfg: BenchConfig, model: str, lines: int) -> bytes:
    """Lines shaped like the measured requests, with prompts of their own (indices after every level's)."""
    first = 1_000_000
    rows = (
        {
            "custom_id": f"bg-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": model,
                "prompt": prompt_token_ids(cfg.seed, first + i, cfg.input_len),
                "max_tokens": cfg.output_len,
                "ignore_eos": True,
                "temperature": 0.0,
            },
        }
        for i in range(lines)
    )
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@asynccontextmanager
async def background_batch(client: httpx.AsyncClient, cfg: BenchConfig, model: str) -> AsyncIterator[BatchProgress]:
    """Submit the batch, wait until its lines are running, yield; then cancel it and wait for it to stop, so the
    next level starts on an idle server."""
    progress = BatchProgress(cfg.background_batch)
    upload = await _ok(
        client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("bench-batch.jsonl", batch_input(cfg, model, progress.lines))},
        )
    )
    batch = await _ok(
        client.post(
            "/v1/batches",
            json={"input_file_id": upload["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
        )
    )
    batch_id = batch["id"]
    try:
        started = await _wait(
            client,
            batch_id,
            lambda b: b["status"] in _FINAL or (b["status"] == "in_progress" and b["request_counts"]["completed"] > 0),
            _START_TIMEOUT_S,
        )
        if started["status"] in _FINAL:
            raise BenchError(f"the background batch ended before the level started: {started['status']}")
        log.info("background batch running", batch_id=batch_id, lines=progress.lines)
        before = started["request_counts"]["completed"]
        yield progress
        now = await _ok(client.get(f"/v1/batches/{batch_id}"))
        progress.completed_during_level = now["request_counts"]["completed"] - before
    finally:
        await client.post(f"/v1/batches/{batch_id}/cancel")
        await _wait(client, batch_id, lambda b: b["status"] in _FINAL, _START_TIMEOUT_S)


async def _ok(request) -> dict:
    response = await request
    if response.status_code != 200:
        raise BenchError(f"background batch: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


async def _wait(client: httpx.AsyncClient, batch_id: str, done, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await _ok(client.get(f"/v1/batches/{batch_id}"))
        if done(batch):
            return batch
        if time.monotonic() > deadline:
            raise BenchError(f"background batch {batch_id} still {batch['status']} after {timeout_s:.0f} s")
        await asyncio.sleep(_POLL_S)
