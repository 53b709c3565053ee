"""How a deployment's worker process is started, watched and stopped on this machine, and what every launcher
(here, and over SSH in ops/ssh_launch.py) has in common: the `inferq worker` arguments, the interface the agent
drives, and turning an exit into a reason a person can act on."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from common.models import PACKAGED_MODELS, ModelNotFound, packaged_model
from common.process import spawn, terminate
from common.settings import Settings
from contracts.deployments import ProcessStats
from ops.launcher import ENV_PREFIX, child_env

_STOP_TIMEOUT_S = 10.0
_LINE_LIMIT = 1 << 20  # a longer output line is cut (a traceback line never is)


class LaunchFailed(Exception):
    """The worker could not be started; the message is the reason shown on the deployment."""


class WorkerLaunch(Protocol):
    """One worker process of a deployment, wherever it runs."""

    host: str | None  # as the worker reports it in the registry (its hostname)
    pid: int | None

    async def start(self) -> None: ...  # raises LaunchFailed
    def lines(self) -> AsyncIterator[str]: ...  # its output (stdout and stderr), until it exits
    async def wait(self) -> int | None: ...  # its exit code (None: killed by a signal we cannot name)
    async def stop(self) -> None: ...  # terminate it (idempotent)
    async def stats(self) -> ProcessStats: ...
    def explain_exit(self, code: int | None, tail: Sequence[str]) -> str: ...


def worker_arguments(settings: Settings, model_id: str, nats_url: str) -> list[str]:
    """`inferq worker …` arguments (after the executable) for a deployment of `model_id`. The sim engine names
    every model `sim` unless told otherwise, so it gets the deployment's model id as its served name. JSON logs:
    a terminal (an SSH pty) would otherwise get colour codes in every line."""
    arguments = ["worker", "--model", model_id, "--engine", settings.engine, "--nats", nats_url, "--log-format", "json"]
    if settings.engine == "sim":
        arguments += ["--served-model-name", model_id]
    return arguments


_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def shown(argv: Sequence[str]) -> str:
    """The command line as logged and published: a NATS URL's password (`nats://user:pass@host`) masked."""
    return _URL_PASSWORD.sub(r"\1***@", shlex.join(argv))


def model_problem(spec: str) -> str | None:
    """Why `spec` cannot be served from this machine, or None if it looks servable: a packaged model whose
    package is installed, a local .gguf file, an HF directory (or one with exactly one .gguf), or a hub id (the
    worker downloads it; if that fails, the worker exits and the deployment fails with its error)."""
    if spec in PACKAGED_MODELS:
        try:
            packaged_model(PACKAGED_MODELS[spec])
        except ModelNotFound as exc:
            return str(exc)
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return None if path.suffix == ".gguf" else f"{spec} is not a .gguf file"
    if path.is_dir():
        if (path / "config.json").exists() or len(list(path.glob("*.gguf"))) == 1:
            return None
        return f"{spec} has no config.json (and not exactly one .gguf file)"
    if path.is_absolute() or spec.startswith((".", "~")):
        return f"model path {spec!r} does not exist"
    return None


def explain_exit(code: int | None, tail: Sequence[str]) -> str:
    """ "worker exited with code 1: <its last words>"; a JSON log line is shortened to its event and error."""
    last = next((_readable(line) for line in reversed(tail) if line.strip()), "")
    status = "was killed" if code is None or code < 0 else f"exited with code {code}"
    return f"the worker {status}" + (f": {last}" if last else "")


def _readable(line: str) -> str:
    try:
        entry = json.loads(line)
    except ValueError:
        return line.strip()
    if not isinstance(entry, dict):
        return line.strip()
    parts = [str(entry.get(key)) for key in ("event", "error") if entry.get(key)]
    return ": ".join(parts) or line.strip()


class LocalWorker:
    """`python -m ops.cli worker …` as a child of the agent, in its own process group, dying with the agent
    (common/process.py), its stdout and stderr read as one line stream."""

    def __init__(self, settings: Settings, model_id: str):
        self._settings = settings
        self._argv = [sys.executable, "-m", "ops.cli", *worker_arguments(settings, model_id, settings.nats_url or "")]
        env = child_env(settings)
        env.pop(f"{ENV_PREFIX}SERVED_MODEL_NAME", None)  # the agent's own default must not rename the model
        self._env = env
        self.host: str | None = socket.gethostname()
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stats: psutil.Process | None = None
        self._started_at: float | None = None

    @property
    def command(self) -> str:
        return shown(["inferq", *self._argv[3:]])

    async def start(self) -> None:
        try:
            # From the agent's event-loop thread, which lives as long as the agent: the child dies with it.
            self._proc = spawn(self._argv, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise LaunchFailed(f"cannot start the worker: {exc}") from exc
        self.pid = self._proc.pid
        self._started_at = time.time()
        try:
            self._stats = psutil.Process(self.pid)
            self._stats.cpu_percent(None)  # the first reading is 0.0; later ones measure since the previous one
        except psutil.Error:
            self._stats = None

    async def lines(self) -> AsyncIterator[str]:
        assert self._proc is not None and self._proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._proc.stdout)
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # longer than the limit: skip the rest of it
                    raw = b"[line too long]\n"
                if not raw:
                    return
                yield raw.decode(errors="replace").rstrip("\r\n")
        finally:
            transport.close()

    async def wait(self) -> int | None:
        assert self._proc is not None
        return await asyncio.to_thread(self._proc.wait)

    async def stop(self) -> None:
        if self._proc is not None:
            await asyncio.to_thread(terminate, self._proc, timeout_s=_STOP_TIMEOUT_S)

    async def stats(self) -> ProcessStats:
        running = self._proc is not None and self._proc.poll() is None
        stats = ProcessStats(host=self.host, pid=self.pid, is_running=running, started_at=self._started_at)
        if not running:
            return stats
        try:
            if self._stats is None:
                self._stats = psutil.Process(self.pid)
            # cpu_percent(None) measures since the previous call (the first call answers 0.0)
            with self._stats.oneshot():
                cpu, memory = self._stats.cpu_percent(None), self._stats.memory_info().rss
        except psutil.Error:
            return stats
        return stats.model_copy(
            update={"cpu_percent": cpu, "memory_bytes": memory, "memory_total_bytes": psutil.virtual_memory().total}
        )

    def explain_exit(self, code: int | None, tail: Sequence[str]) -> str:
        return explain_exit(code, tail)
