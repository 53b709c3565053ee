"""A JetStream cluster of real nats-server processes on loopback: the multi-machine tests and the chaos run.

Each node gets its own client, route and monitoring port, its own store directory and a name (n1, n2, …); every
node lists every route, as ops/nats/cluster-node.conf does for docker-compose.yml. `wait_for_jetstream` returns
once a meta leader is elected and a stream with one replica per node can be created, which is later than the
nodes' `/healthz` (a node answers before the cluster agrees on a leader)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import nats
from nats.js import errors as jse
from nats.js.api import StreamConfig

from broker.embedded import find_nats_server
from common.process import spawn, terminate
from ops.chaos.processes import free_port

START_ATTEMPTS = 3


class _PortTaken(RuntimeError):
    """A node could not bind a port picked for it: something else took it after it was picked."""


def _three_free_ports() -> tuple[int, int, int]:
    """Client, route and monitoring ports for one node."""
    return free_port(), free_port(), free_port()


@dataclass(slots=True)
class ClusterNode:
    name: str
    client_port: int
    route_port: int
    http_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "node.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats-server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class NatsCluster:
    """`size` nodes in cluster `name` (one node: a plain JetStream server). `extra_config` is appended to every
    node's config (e.g. `include ./auth.conf`), `files` are copied beside it, `env` is the servers' environment
    on top of ours (the passwords auth.conf reads)."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        name: str = "inferq-test",
        extra_config: str = "",
        files: Sequence[Path] = (),
        env: Mapping[str, str] | None = None,
        route_config: str = "",
    ):
        self.name = name
        self.extra_config = extra_config
        self.route_config = route_config  # inside the cluster block (e.g. a tls block for the routes)
        self.files = list(files)
        self.env = {**os.environ, **(env or {})}
        self.nodes = [ClusterNode(f"n{i + 1}", *_three_free_ports(), root / f"n{i + 1}") for i in range(size)]

    @property
    def urls(self) -> str:
        """All client URLs, comma-separated, as INFERQ_NATS_URL takes them."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start every node. The ports were free when picked, in the kernel's ephemeral range, and a node dialling
        its routes before the others listen uses ephemeral ports too: one of them can take a port another node is
        about to bind (seen in CI). Then the whole cluster starts again on new ports, at most `START_ATTEMPTS`
        times."""
        for _ in range(START_ATTEMPTS - 1):
            try:
                return self._start_once(timeout_s)
            except _PortTaken:
                for node in self.nodes:
                    node.client_port, node.route_port, node.http_port = _three_free_ports()
        return self._start_once(timeout_s)

    def _start_once(self, timeout_s: float) -> Self:
        binary = find_nats_server()
        try:
            for node in self.nodes:
                node.dir.mkdir(parents=True, exist_ok=True)
                for file in self.files:
                    shutil.copy(file, node.dir / file.name)
                node.config_path.write_text(self._config(node))
                with open(node.log_path, "ab") as node_log:
                    node.proc = spawn(
                        [str(binary), "-c", str(node.config_path)],
                        env=self.env,
                        stdout=node_log,
                        stderr=subprocess.STDOUT,
                        die_with_parent=False,
                    )
            deadline = time.monotonic() + timeout_s
            for node in self.nodes:
                self._await_listening(node, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, index: int, timeout_s: float = 30.0) -> None:
        """Bring a stopped or killed node back on its own config and store (it rejoins the cluster)."""
        node = self.nodes[index]
        if node.running:
            return
        with open(node.log_path, "ab") as node_log:
            node.proc = spawn(
                [str(find_nats_server()), "-c", str(node.config_path)],
                env=self.env,
                stdout=node_log,
                stderr=subprocess.STDOUT,
                die_with_parent=False,
            )
        self._await_listening(node, time.monotonic() + timeout_s)

    def signal_node(self, index: int, signum: int) -> None:
        """SIGSTOP / SIGCONT a node: a machine that stalls (a long GC pause, a swapped-out VM) and comes back."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signum)

    def stop_node(self, index: int) -> None:
        node = self.nodes[index]
        if node.proc is not None:
            terminate(node.proc, timeout_s=10)
            node.proc = None

    def kill_node(self, index: int) -> None:
        """SIGKILL: no goodbye to the cluster or the clients, as when a machine dies."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait()
            node.proc = None

    def node_index(self, name: str) -> int:
        return next(i for i, node in enumerate(self.nodes) if node.name == name)

    def stop(self) -> None:
        for index in range(len(self.nodes)):
            self.stop_node(index)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def wait_for_jetstream(self, timeout_s: float = 30.0, **connect_options) -> None:
        """Until the cluster has a meta leader and places a stream on every node (replicas = size)."""
        deadline = time.monotonic() + timeout_s
        nc = await nats.connect([node.url for node in self.nodes], connect_timeout=2, **connect_options)
        try:
            js = nc.jetstream(timeout=2)
            while True:
                try:
                    await js.account_info()
                    probe = StreamConfig(name="CLUSTER_PROBE", subjects=["cluster.probe"], num_replicas=len(self.nodes))
                    await js.add_stream(probe)
                    await js.delete_stream(probe.name)
                    return
                except (jse.Error, TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                    if time.monotonic() > deadline:
                        tails = "\n".join(f"--- {node.name}\n{node.log_tail()}" for node in self.nodes)
                        raise TimeoutError(f"no JetStream meta leader after {timeout_s} s: {exc!r}\n{tails}") from exc
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    # --- internals ----------------------------------------------------------------------------------------

    def _config(self, node: ClusterNode) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{other.route_port}" for other in self.nodes)
        cluster = (
            (
                "cluster {\n"
                f"  name: {self.name}\n"
                f"  listen: 127.0.0.1:{node.route_port}\n"
                f"  routes: [{routes}]\n" + self.route_config + "}\n"
            )
            if len(self.nodes) > 1
            else ""
        )
        return (
            f"server_name: {node.name}\n"
            f"listen: 127.0.0.1:{node.client_port}\n"
            f"http: 127.0.0.1:{node.http_port}\n"
            "max_payload: 8MB\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(node.dir / 'store'))}\n"
            "  max_memory_store: 256MB\n"
            "  max_file_store: 16GB\n"  # a reservation, not disk in use: the results stream reserves 1 GB
            "}\n" + cluster + self.extra_config
        )

    @staticmethod
    def _await_listening(node: ClusterNode, deadline: float) -> None:
        # /varz answers as soon as the node serves clients; /healthz would wait for the whole cluster.
        while True:
            if not node.running:
                tail = node.log_tail()
                if "address already in use" in tail:
                    raise _PortTaken(f"nats-server {node.name} exited:\n{tail}")
                raise RuntimeError(f"nats-server {node.name} exited:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/varz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {node.name} not listening:\n{node.log_tail()}")
            time.sleep(0.05)
