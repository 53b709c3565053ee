"""`inferq bench --background-batch` against the live api: each level is measured idle and again while a batch
job runs; the busy/idle TTFT comparison is reported and the batch is cancelled afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

from ops.bench.runner import main as bench_main
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


async def test_bench_measures_interactive_traffic_next_to_a_running_batch(api, tmp_path) -> None:
    report = tmp_path / "bench.json"
    argv = [
        "--base-url",
        api.base_url,
        "--model",
        TINY_MODEL_NAME,
        "--concurrency",
        "2",
        "--num-requests",
        "24",
        "--input-len",
        "8",
        "--output-len",
        "48",
        "--background-batch",
        "1000",
        "--json",
        str(report),
    ]
    import asyncio

    assert await asyncio.to_thread(bench_main, argv) == 0
    document = json.loads(report.read_text())
    busy = [level for level in document["levels"] if level["target"] == "+batch"]
    assert len(busy) == 1 and busy[0]["errors"] == 0 and busy[0]["num_requests"] == 24
    [row] = document["background_batch"]
    assert row["concurrency"] == 2 and row["batch_lines"] == 1000
    assert row["idle_ttft_p50_ms"] > 0 and row["busy_ttft_p50_ms"] > 0
    assert row["ttft_p50_ratio_busy_over_idle"] == pytest.approx(row["busy_ttft_p50_ms"] / row["idle_ttft_p50_ms"])
    assert row["batch_lines_completed_during_level"] > 0  # slots were free beside 2 streams: the batch ran too
    # (batch counts are published once a second, so the level is made to last several seconds)
    async with httpx.AsyncClient(base_url=api.base_url) as client:
        batches = (await client.get("/v1/batches", params={"limit": 5})).json()["data"]
    bench_batch = next(b for b in batches if b["request_counts"]["total"] == 1000)
    assert bench_batch["status"] == "cancelled"  # the bench leaves no load behind
