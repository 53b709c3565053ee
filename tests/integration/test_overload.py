"""Ten times more requests than the worker can serve, for a minute: every request is answered at once with either
its completion or a 429 with Retry-After (never a 5xx, never a hang), and neither the api nor the worker grows
without bound meanwhile. Afterwards the service answers normally."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import psutil
import pytest
import structlog

from tests.integration.harness import own_sim_stack

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
log = structlog.get_logger(__name__)

SLOTS, TOKENS, RATE = 4, 10, 20.0  # the worker serves 4 x 20 / 10 = 8 requests a second
OFFERED_PER_S = 80  # ten times that
DURATION_S = 60.0
ALLOWED_GROWTH_MB = 40.0


async def test_ten_times_overload_for_a_minute_is_answered_honestly_in_bounded_memory(base_settings, tmp_path) -> None:
    async with own_sim_stack(
        base_settings,
        tmp_path,
        served_model_name="sim",
        sim_tokens_per_s=RATE,
        max_num_seqs=SLOTS,
        queue_max_requests=32,
        queue_timeout_s=30.0,
    ) as (settings, worker, api):
        processes = {"api": psutil.Process(api.proc.pid), "worker": psutil.Process(worker.proc.pid)}
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}
        outcomes: Counter[str] = Counter()
        retry_after: list[int] = []
        # Idle connections are dropped well before uvicorn closes them (5 s keep-alive): at the same 5 s, a request
        # sent on a connection the server was closing met a reset (httpx.ReadError) in a CI run.
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60, limits=limits) as http:

            async def one(number: int) -> None:
                response = await http.post(
                    "/v1/completions",
                    json={"model": "sim", "prompt": f"w{number % 50} w1", "max_tokens": TOKENS, "ignore_eos": True},
                )
                if response.status_code == 429:
                    assert response.json()["error"]["type"] == "rate_limit_error" or response.json()["error"][
                        "code"
                    ] in ("queue_full", "rate_limit_exceeded"), response.text
                    retry_after.append(int(response.headers["retry-after"]))
                outcomes[str(response.status_code)] += 1

            start = time.monotonic()
            pending: set[asyncio.Task] = set()
            sent, next_sample = 0, 0.0
            while (elapsed := time.monotonic() - start) < DURATION_S:
                while sent < elapsed * OFFERED_PER_S:  # open loop: the offered rate does not wait for answers
                    task = asyncio.create_task(one(sent))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                if elapsed >= next_sample:
                    next_sample += 5.0
                    for name, process in processes.items():
                        samples[name].append((elapsed, process.memory_info().rss / 1e6))
                await asyncio.sleep(0.1)
            await asyncio.wait_for(asyncio.gather(*pending), timeout=90)  # nothing hangs
            after = await http.post("/v1/completions", json={"model": "sim", "prompt": "w1", "max_tokens": 3})

    retry_after.sort()
    log.info(
        "overload.outcome",
        sent=sent,
        outcomes=dict(outcomes),
        rss_mb=samples,
        retry_after_p50=retry_after[len(retry_after) // 2],
    )
    assert after.status_code == 200
    assert set(outcomes) <= {"200", "429"}, outcomes  # honest: served or told to come back, nothing else
    # Overloaded, and still serving (at a quarter of the nominal 8/s at least, on a shared 2-core machine).
    assert outcomes["429"] > sent / 2 and outcomes["200"] >= DURATION_S * 8 * 0.25, (sent, outcomes)
    # Told to come back when the queue will have room: ~32 queued at ~8 taken per second is ~4 s (not a fixed 1 s).
    assert min(retry_after) >= 1 and 2 <= retry_after[len(retry_after) // 2] <= 60, Counter(retry_after)
    for name, series in samples.items():
        settled = [rss for elapsed, rss in series if elapsed >= 15]
        assert max(settled) - settled[0] < ALLOWED_GROWTH_MB, (name, series)
