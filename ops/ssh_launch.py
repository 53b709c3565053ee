"""A deployment's worker on another host, over SSH (asyncssh): log in with the password or key from the deploy
command (used for this one login, kept only in this object's memory), run `inferq worker` on a pty so it dies
(SIGHUP) when the session ends, and read its output as the line stream the agent publishes.

The remote command first prints a marker with its pid and host name and then `exec`s the worker, so the pid is
the worker's and the agent can find it in the registry (the worker registers `socket.gethostname()`)."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import AsyncIterator, Sequence

import asyncssh
import structlog

from common.settings import Settings
from contracts.deployments import ProcessStats, SshConfig
from ops.deploy_launch import LaunchFailed, explain_exit, shown, worker_arguments

log = structlog.get_logger(__name__)

_MARKER = "__inferq_worker__"
_STOP_TIMEOUT_S = 10.0
_MARKER_TIMEOUT_S = 15.0
_NOT_FOUND, _NOT_EXECUTABLE = 127, 126


class SshWorker:
    def __init__(self, settings: Settings, model_id: str, ssh: SshConfig):
        self._ssh = ssh
        self._connect_timeout_s = settings.deploy_ssh_connect_timeout_s
        self._known_hosts = settings.deploy_ssh_known_hosts
        self._inferq = settings.deploy_remote_inferq
        nats_url = settings.deploy_nats_url or settings.nats_url or ""
        self._argv = [settings.deploy_remote_inferq, *worker_arguments(settings, model_id, nats_url)]
        self.host: str | None = None
        self.pid: int | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._process: asyncssh.SSHClientProcess | None = None
        self._started_at: float | None = None
        self._early_lines: list[str] = []  # output before the marker (a login banner, a shell complaint)

    @property
    def command(self) -> str:
        return shown(self._argv)

    @property
    def target(self) -> str:
        return f"{self._ssh.username}@{self._ssh.host}:{self._ssh.port}"

    async def start(self) -> None:
        await self._connect()
        assert self._conn is not None
        script = f'echo "{_MARKER} $$ $(uname -n)"; exec {shlex.join(self._argv)}'
        try:
            self._process = await self._conn.create_process(
                script, term_type="dumb", encoding="utf-8", errors="replace"
            )
            await asyncio.wait_for(self._read_marker(), _MARKER_TIMEOUT_S)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise LaunchFailed(f"cannot run the worker on {self.target}: {exc}") from exc
        self._started_at = time.time()

    async def _connect(self) -> None:
        ssh = self._ssh
        secret = {"password": ssh.password.get_secret_value(), "client_keys": None} if ssh.password else {}
        try:
            if ssh.private_key is not None:
                secret = {"client_keys": [asyncssh.import_private_key(ssh.private_key.get_secret_value())]}
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise LaunchFailed(f"the private key could not be read: {type(exc).__name__}") from None
        known_hosts = str(self._known_hosts) if self._known_hosts else None
        log.info("ssh.connecting", target=self.target, verify_host_key=known_hosts is not None)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                self._conn = await asyncssh.connect(
                    ssh.host, ssh.port, username=ssh.username, known_hosts=known_hosts, agent_path=None, **secret
                )
        except asyncssh.PermissionDenied:
            raise LaunchFailed(f"SSH authentication failed for {self.target}") from None
        except asyncssh.HostKeyNotVerifiable:
            raise LaunchFailed(f"the SSH host key of {ssh.host} is not in {known_hosts}") from None
        except TimeoutError:
            raise LaunchFailed(
                f"SSH connection to {self.target} timed out after {self._connect_timeout_s:g} s"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise LaunchFailed(f"SSH connection to {self.target} failed: {exc}") from None
        finally:
            secret.clear()
            # Used once: nothing of it stays in this object (the login either happened or failed).
            self._ssh = ssh.model_copy(update={"password": None, "private_key": None})

    async def _read_marker(self) -> None:
        assert self._process is not None
        while line := await self._process.stdout.readline():
            text = line.rstrip("\r\n")
            if text.startswith(_MARKER):
                _, pid, host = text.split(maxsplit=2)
                self.pid, self.host = int(pid), host.strip()
                return
            self._early_lines.append(text)
        raise LaunchFailed(
            f"the shell on {self.target} ended before starting the worker: {' '.join(self._early_lines[-3:])}"
        )

    async def lines(self) -> AsyncIterator[str]:
        assert self._process is not None
        for line in self._early_lines:
            yield line
        while line := await self._process.stdout.readline():
            yield line.rstrip("\r\n")

    async def wait(self) -> int | None:
        assert self._process is not None
        completed = await self._process.wait(check=False)
        return completed.exit_status if completed.exit_signal is None else None

    async def stop(self) -> None:
        if self._conn is None:
            return
        try:
            if self._process is not None and self._process.exit_status is None and self.pid is not None:
                await self._signal("TERM")
                try:
                    await asyncio.wait_for(self._process.wait(check=False), _STOP_TIMEOUT_S)
                except TimeoutError:
                    await self._signal("KILL")
        except (asyncssh.Error, OSError) as exc:
            log.warning("ssh.stop_failed", target=self.target, error=str(exc))
        finally:
            self._conn.close()  # the pty's hang-up ends anything left of the session

    async def _signal(self, name: str) -> None:
        assert self._conn is not None
        await self._conn.run(f"kill -{name} {self.pid}", check=False)

    async def stats(self) -> ProcessStats:
        running = self._process is not None and self._process.exit_status is None
        stats = ProcessStats(host=self.host, pid=self.pid, is_running=running, started_at=self._started_at)
        if not running or self._conn is None:
            return stats
        try:
            result = await self._conn.run(f"ps -o pcpu=,rss= -p {self.pid}; grep MemTotal /proc/meminfo", check=False)
            usage, total = str(result.stdout).splitlines()[:2]
            cpu, rss_kib = usage.split()
            return stats.model_copy(
                update={
                    "cpu_percent": float(cpu),
                    "memory_bytes": int(rss_kib) * 1024,
                    "memory_total_bytes": int(total.split()[1]) * 1024,
                }
            )
        except (asyncssh.Error, OSError, ValueError):
            return stats

    def explain_exit(self, code: int | None, tail: Sequence[str]) -> str:
        if code in (_NOT_FOUND, _NOT_EXECUTABLE):
            problem = "not found" if code == _NOT_FOUND else "not executable"
            return (
                f"inferq {problem} on {self._ssh.host} ({self._inferq!r}); install inferq there or set "
                f"INFERQ_DEPLOY_REMOTE_INFERQ to its path"
            )
        return explain_exit(code, tail)
