"""Real processes for integration tests: a worker subprocess and the API served by uvicorn in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import uvicorn

from api.app import create_app
from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from ops.chaos.processes import free_port, settings_env

API_BOOT = "from api.main import run_api; from common.settings import Settings; run_api(Settings())"
WORKER_BOOT = "from engine_worker.main import run_worker; from common.settings import Settings; run_worker(Settings())"


class WorkerProcess:
    """`engine_worker.main.run_worker` in its own process, as `inferq worker` runs it. `constants`: module
    constants set before it starts, {"package.module.NAME": value}, for the few waits no setting reaches (a
    test that waits out the request queue's 30 s ack wait on purpose can wait out a shorter one). `preamble`:
    Python run before it starts, for faults no setting causes (tests/integration/poison_sim.py)."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        extra_env: Mapping[str, str] | None = None,
        constants: Mapping[str, float] | None = None,
        preamble: str = "",
    ):
        self.settings = settings
        self.log_path = log_path
        self.extra_env = dict(extra_env or {})
        self.constants = dict(constants or {})
        self.preamble = preamble
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "\n".join([self.preamble, _with_constants(WORKER_BOOT, self.constants)])],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _with_constants(boot: str, constants: Mapping[str, float]) -> str:
    """`boot` preceded by `import package.module; package.module.NAME = value` for each of `constants`."""
    lines = []
    for name, value in constants.items():
        module = name.rpartition(".")[0]
        lines.append(f"import {module}; {name} = {value!r}")
    return "\n".join([*lines, boot])


class ApiServer:
    """The real app (`create_app`) behind uvicorn on a free loopback port, in a background thread."""

    def __init__(self, settings: Settings):
        self.settings = settings.model_copy(update={"port": free_port()})
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(self.settings), host="127.0.0.1", port=self.settings.port, log_config=None, lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def start(self, timeout: float = 30) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


async def wait_healthy(base_url: str, worker: WorkerProcess | None = None, timeout: float = 120) -> None:
    """Until `/health` says a worker is live (the worker loads its model first)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base_url) as client:
        while time.monotonic() < deadline:
            if worker is not None and worker.proc is not None and worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{worker.log_tail()}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"no healthy worker within {timeout} s" + (f":\n{worker.log_tail()}" if worker else ""))


async def wait_for_model(base_url: str, model: str, worker: WorkerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base_url) as http:
        while model not in (await http.get("/health")).json()["models"]:
            assert worker.proc.poll() is None, worker.log_tail()
            assert time.monotonic() < deadline, "worker did not register"
            await asyncio.sleep(0.2)


class ApiProcess:
    """The api (with its batch and response runners) in a process of its own, so it can be SIGKILLed."""

    def __init__(self, settings: Settings, log_path: Path):
        self.settings = settings.model_copy(update={"port": free_port()})
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def start(self) -> ApiProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", API_BOOT],
                env={**os.environ, **settings_env(self.settings)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait()


def own_sim_settings(base_settings: Settings, nats_url: str, tmp_path: Path, **overrides: object) -> Settings:
    """Settings of sim workers and apis on a nats-server and data dir of the test's own; `overrides` are Settings
    fields."""
    return base_settings.model_copy(
        update={"nats_url": nats_url, "data_dir": tmp_path / "data", "engine": "sim", **overrides}
    )


@contextlib.asynccontextmanager
async def own_sim_stack(
    base_settings: Settings, tmp_path: Path, **overrides: object
) -> AsyncIterator[tuple[Settings, WorkerProcess, ApiProcess]]:
    """A nats-server, a sim worker and an api process of this test's own (nothing shared can disturb a load or
    fault test, and its kills disturb nothing else); `overrides` are Settings fields."""
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as nats:
        settings = own_sim_settings(base_settings, nats.url, tmp_path, **overrides)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        api = ApiProcess(settings, tmp_path / "api.log").start()
        try:
            await wait_healthy(api.base_url, worker)
            yield settings, worker, api
        finally:
            api.stop()
            worker.stop()


def sim_cluster_settings(urls: str, data_dir: Path, model: str, **overrides: object) -> Settings:
    """Settings for sim workers and apis over a 3-node cluster (streams replicated on every node), with the
    silence and queue timeouts the fault tests rely on; `overrides` are Settings fields."""
    return Settings(
        nats_url=urls,
        engine="sim",
        served_model_name=model,
        max_num_seqs=16,
        nats_replicas=3,
        queue_timeout_s=60.0,
        worker_silence_timeout_s=3.0,
        log_format="json",
        data_dir=data_dir,
        **overrides,
    )
