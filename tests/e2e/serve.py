"""Start `inferq serve` as a user does (its own embedded NATS, a fresh data dir) and wait until it is healthy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.integration.harness import free_port


def start_serve(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`inferq serve` with `env` on top of ours, on a free port, output to `log_path`; returns it and its base URL."""
    port = free_port()
    full_env = {**os.environ, "INFERQ_PORT": str(port), **env}
    full_env.pop("INFERQ_NATS_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve"], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(
    proc: subprocess.Popen,
    base: str,
    log_path: Path,
    timeout: float,
    ready: Callable[[dict], bool] = lambda health: True,
) -> None:
    """Poll /health until it answers 200 and `ready(its json)`; fail with the log's tail if serve exits."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            health = httpx.get(f"{base}/health", timeout=2)
            if health.status_code == 200 and ready(health.json()):
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"inferq serve did not become ready:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)
