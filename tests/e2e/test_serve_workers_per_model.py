"""`inferq serve --workers-per-model 2` (sim engine, no model): both workers register, share the model's queue,
and each one serves part of a burst of concurrent requests."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.serve import start_serve, wait_healthy

MODEL = "sim"


def _generated_tokens_by_worker(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        sample.labels["worker_id"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "inferq:generation_tokens_total"
    }


def test_two_workers_per_model_share_the_queue(tmp_path) -> None:
    log_path = tmp_path / "serve.log"
    proc, base = start_serve(
        {
            "INFERQ_DATA_DIR": str(tmp_path / "data"),
            "INFERQ_ENGINE": "sim",
            "INFERQ_SIM_TOKENS_PER_S": "50",
            "INFERQ_MAX_NUM_SEQS": "4",
            "INFERQ_WORKERS_PER_MODEL": "2",
            "INFERQ_DEPLOY_AGENT": "false",
        },
        log_path,
    )
    try:
        wait_healthy(proc, base, log_path, timeout=120, ready=lambda health: health["workers"] == 2)

        # 16 requests of 20 tokens at 50 tokens/s: 4 slots per worker, so one worker alone would need 4 rounds.
        def complete(i: int) -> dict:
            body = {"model": MODEL, "prompt": f"w{i} w2", "max_tokens": 20, "ignore_eos": True}
            return httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(complete, range(16)))
        assert all(reply["usage"]["completion_tokens"] == 20 for reply in replies), replies[0]
        by_worker = _generated_tokens_by_worker(base)
        assert len(by_worker) == 2 and all(tokens >= 20 for tokens in by_worker.values()), by_worker
        assert sum(by_worker.values()) == 16 * 20
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
