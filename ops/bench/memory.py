"""Resident memory of the server under test, sampled while the bench runs: peak RSS per process and in total.

Which processes: the one listening on the bench's port (found through /proc, so the server must run on this
machine as the same user, or `--server-pid` names it), widened to the whole `inferq serve` tree when that process
is a child of an `inferq serve` launcher (api, workers, agent, the embedded nats-server). Children started or
restarted later are picked up at the next sample. A remote server is not sampled; the summary says so.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from pathlib import PurePath
from urllib.parse import urlsplit

import psutil

MIB = 2**20
_ROLES = ("serve", "worker", "api", "agent")


@dataclass(slots=True)
class ProcessPeak:
    pid: int
    role: str
    peak_rss_bytes: int = 0
    last_rss_bytes: int = 0


@dataclass(slots=True)
class MemoryReport:
    """Per-process peaks, the peak of the summed RSS, and the sum at the last sample (after the traffic)."""

    root_pid: int | None
    note: str | None = None  # why nothing was sampled
    settle_s: float = 0.0  # the last sample was taken this long after the traffic
    processes: list[ProcessPeak] = field(default_factory=list)
    peak_total_bytes: int = 0
    last_total_bytes: int = 0
    samples: int = 0


def role_of(cmdline: list[str], name: str) -> str:
    """`python -m ops.cli worker` / `inferq api` → worker / api; nats-server by its name; else the name."""
    if "nats-server" in name or (cmdline and "nats-server" in PurePath(cmdline[0]).name):
        return "nats-server"
    for index, part in enumerate(cmdline[:-1]):
        if (part == "ops.cli" or PurePath(part).name == "inferq") and cmdline[index + 1] in _ROLES:
            return cmdline[index + 1]
    return name


def server_root(base_url: str, pid: int | None = None) -> psutil.Process | None:
    """The process tree to sample: `pid`, else the local listener on the URL's port, raised to its `inferq
    serve` parent when it has one. None when the server is not a local process we can see."""
    if pid is not None:
        return psutil.Process(pid)
    parts = urlsplit(base_url)
    if not _is_local(parts.hostname or "127.0.0.1"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    listener = _listener(port)
    if listener is None:
        return None
    parent = listener.parent()
    if parent is not None and role_of(_cmdline(parent), parent.name()) == "serve":
        return parent
    return listener


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return False
    return address.is_loopback or address.is_unspecified or str(address) in _own_addresses()


def _own_addresses() -> set[str]:
    return {entry.address for entries in psutil.net_if_addrs().values() for entry in entries}


def _listener(port: int) -> psutil.Process | None:
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid)
    return None


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


class RssSampler:
    """Samples the tree every `interval_s` on a thread (psutil calls block) between `start()` and `stop()`."""

    def __init__(
        self, root: psutil.Process | None, interval_s: float = 0.5, note: str | None = None, settle_s: float = 0.0
    ) -> None:
        self._root = root
        self._interval_s = interval_s
        self._settle_s = settle_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self.report = MemoryReport(root_pid=root.pid if root else None, note=note, settle_s=settle_s)
        self._by_pid: dict[int, ProcessPeak] = {}

    def start(self) -> RssSampler:
        if self._root is not None:
            self.sample()
            self._thread.start()
        return self

    def stop(self) -> MemoryReport:
        """After `settle_s` more seconds of sampling: the server frees memory once idle (a worker gives its KV
        pages back after 2 s), and what it holds then is the figure that matters between bursts."""
        if self._thread.is_alive():
            self._stop.wait(self._settle_s)
            self._stop.set()
            self._thread.join()
        if self._root is not None:
            self.sample()  # the figure after the traffic
        self.report.processes = sorted(self._by_pid.values(), key=lambda p: -p.peak_rss_bytes)
        return self.report

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def sample(self) -> None:
        assert self._root is not None
        try:
            tree = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:  # the server is gone: keep what was seen
            return
        total = 0
        for process in tree:
            try:
                rss = process.memory_info().rss
                peak = self._by_pid.get(process.pid)
                if peak is None:
                    peak = self._by_pid[process.pid] = ProcessPeak(
                        process.pid, role_of(_cmdline(process), process.name())
                    )
            except psutil.Error:  # exited between listing and reading
                continue
            peak.peak_rss_bytes = max(peak.peak_rss_bytes, rss)
            peak.last_rss_bytes = rss
            total += rss
        for pid in set(self._by_pid) - {process.pid for process in tree}:
            self._by_pid[pid].last_rss_bytes = 0  # exited (a restarted child shows up under its new pid)
        self.report.samples += 1
        self.report.peak_total_bytes = max(self.report.peak_total_bytes, total)
        self.report.last_total_bytes = total


def format_memory(report: MemoryReport | None, title: str = "server memory") -> str:
    if report is None:
        return ""
    if not report.samples:
        return f"\n{title}: not sampled ({report.note or 'no local server process found'})\n"
    lines = [
        "",
        f"{title} (RSS, {report.samples} samples of the process tree under pid {report.root_pid}; "
        f"MiB; 'after' = the last sample, {report.settle_s:g} s after the traffic)",
        f"{'process':<14}{'pid':>8}{'peak':>9}{'after':>9}",
    ]
    for process in report.processes:
        lines.append(
            f"{process.role:<14}{process.pid:>8}{process.peak_rss_bytes / MIB:>9.0f}"
            f"{process.last_rss_bytes / MIB:>9.0f}"
        )
    lines.append(f"{'total':<14}{'':>8}{report.peak_total_bytes / MIB:>9.0f}{report.last_total_bytes / MIB:>9.0f}")
    return "\n".join(lines) + "\n"
