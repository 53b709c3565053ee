"""The bench measures a started server only once it is ready: for inferq, once no worker still compiles its
decode step (it serves meanwhile, eager, which is not the steady state the bench reports)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI

from ops.bench.servers import StartedServer, _wait_ready
from tests.ops.test_bench import _logging, serve  # noqa: F401 - _logging is an autouse fixture


def test_the_bench_waits_until_no_worker_compiles_its_decode_step(tmp_path: Path) -> None:
    polls: list[int] = []  # the `compiling` each /health answered

    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        polls.append(1 if len(polls) < 3 else 0)  # healthy from the start, compiling for three polls
        return {"status": "healthy", "workers": 1, "compiling": polls[-1]}

    proc = subprocess.Popen(["sleep", "120"])
    try:
        with serve(SimpleNamespace(app=lambda: app)) as url:
            server = StartedServer("inferq", url, proc.pid, tmp_path / "inferq.log")
            asyncio.run(_wait_ready(server, proc))
    finally:
        proc.kill()
        proc.wait()
    assert polls == [1, 1, 1, 0]  # ready at the first answer without a compile under way, not before
