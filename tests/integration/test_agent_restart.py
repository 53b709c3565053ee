"""A node agent that crashes (SIGKILL, as `inferq serve` sees an OOM kill) takes its deployments' workers with it
(parent death signal); started again on the same data dir it has the same id, finds the deployments it held in
NATS KV and starts their workers again, and the deployed model serves again. Real `inferq agent` processes,
real sim workers, the API and nats-server of test_deployments.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from broker.connection import connect
from broker.deployments import DeploymentStore
from common.settings import Settings
from contracts.deployments import Deployment
from ops.chaos.processes import settings_env
from tests.integration.harness import ApiServer
from tests.integration.test_deployments import deploy_api, deploy_nats, deploy_settings, gone, wait_status

pytestmark = pytest.mark.asyncio
__all__ = ["deploy_api", "deploy_nats", "deploy_settings"]  # fixtures used here

MODEL = "sim-restored"


class AgentProcess:
    """`inferq agent` as its own process, so it can be SIGKILLed."""

    def __init__(self, settings: Settings, log_path: Path):
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> AgentProcess:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "agent"],
                env={**os.environ, **settings_env(self.settings)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    async def ready(self, timeout_s: float = 60) -> None:
        """Until this start logged `agent.ready` (it has restored what it held and takes deploy commands)."""
        deadline = time.monotonic() + timeout_s
        while self.log_path.read_text(errors="replace").count('"agent.ready"') < self.starts:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, f"the agent is not ready:\n{self.log_path.read_text()}"
            await asyncio.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def stored(settings: Settings, deployment_id: str) -> Deployment:
    async with connect(settings.nats_url, "agent-restart-test") as nc:
        store = await DeploymentStore.open(nc.jetstream(), settings.deploy_log_history)
        found = await store.get(deployment_id)
    assert found is not None
    return found.record


async def test_a_restarted_agent_starts_its_deployments_worker_again(
    deploy_api: ApiServer, deploy_settings: Settings, tmp_path: Path
) -> None:
    settings = deploy_settings.model_copy(update={"data_dir": tmp_path / "agent"})
    agent = AgentProcess(settings, tmp_path / "agent.log").start()
    try:
        await agent.ready()
        async with httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
            response = await client.post("/api/v1/deploy", json={"model_id": MODEL})
            assert response.status_code == 200, response.text
            deployment_id = response.json()["deployment_id"]
            await wait_status(client, deployment_id, {"active"}, timeout_s=90)
            before = await stored(settings, deployment_id)
            assert before.pid is not None and psutil.Process(before.pid).is_running()

            agent.stop(signal.SIGKILL)  # no clean-up: the record still says active
            deadline = time.monotonic() + 30
            while not gone(before.pid):  # the worker dies with its agent
                assert time.monotonic() < deadline, "the worker outlived its SIGKILLed agent"
                await asyncio.sleep(0.2)

            agent.start()  # same data dir: same agent id
            deadline = time.monotonic() + 90
            while True:
                after = await stored(settings, deployment_id)
                if after.status == "active" and after.pid not in (None, before.pid):
                    break
                assert after.status not in ("failed", "stopped"), after
                assert time.monotonic() < deadline, f"not restored after 90 s: {after}\n{agent.log_path.read_text()}"
                await asyncio.sleep(0.3)
            assert after.agent_id == before.agent_id and after.worker_id != before.worker_id
            assert psutil.Process(after.pid).is_running()

            completion = await client.post("/v1/completions", json={"model": MODEL, "prompt": "w5 w6", "max_tokens": 3})
            assert completion.status_code == 200, completion.text
            assert completion.json()["usage"]["completion_tokens"] == 3

            stopped = await client.delete(f"/api/v1/deployments/{deployment_id}")
            assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
            assert gone(after.pid)
    finally:
        agent.stop()
