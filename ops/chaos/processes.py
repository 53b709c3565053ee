"""inferq processes the chaos run owns: each an `inferq api` or `inferq worker` child it can SIGKILL, SIGSTOP,
SIGCONT and start again on the same settings (the harness restarts what it killed; no supervisor does)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from common.process import spawn, terminate
from common.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as the `INFERQ_*` environment a child process builds the same Settings from."""
    env = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        env[f"INFERQ_{name.upper()}"] = str(value)
    return env


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class ServiceProcess:
    """`inferq <command>` with `settings`, its output appended to `log_path` unbuffered (so the lines written
    before a SIGKILL are all there: the run reads workers' `request.accepted` lines back)."""

    def __init__(self, name: str, command: str, settings: Settings, log_path: Path):
        self.name = name
        self.command = command
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def start(self) -> ServiceProcess:
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = spawn(
                [sys.executable, "-m", "ops.cli", self.command], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        return self

    def kill(self) -> None:
        """SIGKILL: what the kernel's OOM killer does; no goodbye to NATS or to the clients."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def freeze(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()  # a frozen process cannot act on SIGTERM
            terminate(self.proc, timeout_s=10)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.running else 0

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
