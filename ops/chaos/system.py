"""The system under chaos: a 3-node NATS cluster (every stream and bucket with 3 replicas), two api processes and
two sim workers, each given every node's URL. It applies a Fault to its target and brings the target back, and
knows when a process is ready again."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx

from common.settings import Settings
from ops.chaos.cluster import NatsCluster
from ops.chaos.processes import ServiceProcess, free_port
from ops.chaos.schedule import Action, Fault

MODEL = "sim-chaos"
READY_TIMEOUT_S = 90.0


class NotReady(Exception):
    """A process did not come back within READY_TIMEOUT_S."""


class ChaosSystem:
    def __init__(self, root: Path, tokens_per_s: float = 20.0):
        self.root = root
        self.cluster = NatsCluster(root / "nats", size=3, name="inferq-chaos")
        base = Settings(
            nats_url=self.cluster.urls,
            engine="sim",
            served_model_name=MODEL,
            sim_tokens_per_s=tokens_per_s,
            max_num_seqs=16,
            nats_replicas=3,
            queue_timeout_s=60.0,
            worker_silence_timeout_s=3.0,
            batch_job_ack_wait_s=5.0,
            log_format="json",
            data_dir=root / "data",
        )
        # Workers log at debug: their `request.accepted` lines are the record of every generation started.
        self.workers = [
            ServiceProcess(
                f"worker-{i}",
                "worker",
                base.model_copy(update={"data_dir": root / f"worker-{i}", "log_level": "debug"}),
                root / f"worker-{i}.log",
            )
            for i in range(2)
        ]
        self.apis = [
            ServiceProcess(
                f"api-{i}",
                "api",
                base.model_copy(update={"data_dir": root / f"api-{i}", "port": free_port()}),
                root / f"api-{i}.log",
            )
            for i in range(2)
        ]

    @property
    def targets(self) -> list[str]:
        return [
            *(p.name for p in self.apis),
            *(p.name for p in self.workers),
            *(f"nats-{i}" for i in range(len(self.cluster.nodes))),
        ]

    @property
    def services(self) -> list[ServiceProcess]:
        return [*self.apis, *self.workers]

    async def start(self) -> None:
        self.cluster.start()
        await self.cluster.wait_for_jetstream(timeout_s=60)
        for process in self.services:
            process.start()
        for process in self.services:
            await self.wait_ready(process.name)

    def stop(self) -> None:
        for process in self.services:
            process.stop()
        for index in range(len(self.cluster.nodes)):
            self.cluster.signal_node(index, signal.SIGCONT)
        self.cluster.stop()

    # --- faults -------------------------------------------------------------------------------------------

    async def inflict(self, fault: Fault) -> None:
        """Apply `fault`, wait out its downtime, bring the target back and wait until it is ready again."""
        if fault.target.startswith("nats-"):
            index = int(fault.target.removeprefix("nats-"))
            if fault.action is Action.KILL:
                self.cluster.kill_node(index)
            else:
                self.cluster.signal_node(index, signal.SIGSTOP)
            await asyncio.sleep(fault.down_s)
            if fault.action is Action.KILL:
                await asyncio.to_thread(self.cluster.start_node, index)
            else:
                self.cluster.signal_node(index, signal.SIGCONT)
        else:
            process = self._service(fault.target)
            process.kill() if fault.action is Action.KILL else process.freeze()
            await asyncio.sleep(fault.down_s)
            process.start() if fault.action is Action.KILL else process.thaw()
        await self.wait_ready(fault.target)

    async def wait_ready(self, target: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not await self._ready(target):
            if time.monotonic() > deadline:
                raise NotReady(
                    f"{target} not ready {READY_TIMEOUT_S:.0f} s after it was brought back:\n" + self.log_tail(target)
                )
            await asyncio.sleep(0.25)

    def log_tail(self, target: str) -> str:
        if target.startswith("nats-"):
            return self.cluster.nodes[int(target.removeprefix("nats-"))].log_tail()
        return self._service(target).log_tail()

    async def _ready(self, target: str) -> bool:
        if target.startswith("nats-"):  # /healthz: serving and caught up with the cluster's JetStream state
            node = self.cluster.nodes[int(target.removeprefix("nats-"))]
            return await asyncio.to_thread(_http_ok, f"http://127.0.0.1:{node.http_port}/healthz")
        process = self._service(target)
        if not process.running:
            raise NotReady(f"{target} exited:\n{process.log_tail()}")
        if process.command == "worker":  # one `worker.ready` line per start: this start has registered
            text = process.log_path.read_text(errors="replace") if process.log_path.exists() else ""
            return text.count('"worker.ready"') >= process.starts
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"{process.base_url}/health")).status_code == 200
        except httpx.TransportError:
            return False

    def _service(self, name: str) -> ServiceProcess:
        return next(process for process in self.services if process.name == name)

    def rss(self) -> dict[str, int]:
        return {process.name: process.rss() for process in self.services}

    def worker_logs(self) -> list[Path]:
        return [process.log_path for process in self.workers]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
