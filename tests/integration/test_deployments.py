"""Deployments end to end on one machine: the real API, a real nats-server of their own, node agents running in
this process, and real `inferq worker --engine sim` children started by the agents. The SSH path is in
test_deployments_ssh.py (it reuses the fixtures and helpers here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import psutil
import pytest

from broker import subjects
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from ops.agent import Agent
from tests.integration.harness import ApiServer

pytestmark = pytest.mark.asyncio

CLIENT_A, CLIENT_B, MONITOR = "client-a-secret-key", "client-b-secret-key", "monitor-secret-key"
ADMIN = "admin-secret-key"
CATALOGUE = ["sim-owned", "sim-spare"]  # what clients of the auth-on API may deploy


# --- fixtures and helpers (also used by test_deployments_ssh.py) -------------------------------------------------


@pytest.fixture(scope="module")
def deploy_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    """A server of their own: the auth-on API below writes the auth marker into its NATS."""
    with EmbeddedNatsServer(tmp_path_factory.mktemp("deploy-nats"), port=-1) as server:
        yield server


@pytest.fixture(scope="module")
def deploy_settings(deploy_nats: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        nats_url=deploy_nats.url,
        data_dir=tmp_path_factory.mktemp("deploy-data"),
        engine="sim",
        auth="off",
        log_format="json",
        queue_timeout_s=20.0,
        deploy_start_timeout_s=60.0,
        deploy_probe_timeout_s=30.0,
        deploy_ssh_connect_timeout_s=10.0,
    )


@pytest.fixture(scope="module")
def deploy_api(deploy_settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(deploy_settings).start()
    yield server
    server.stop()


@asynccontextmanager
async def running_agent(settings: Settings) -> AsyncIterator[Agent]:
    """A node agent in this process (its workers are real child processes)."""
    async with connect(settings.nats_url, name="test-agent") as nc:
        agent = await Agent.open(nc, settings)
        await agent.start()
        try:
            yield agent
        finally:
            await agent.stop()


async def wait_status(
    client: httpx.AsyncClient, deployment_id: str, wanted: set[str], timeout_s: float = 60, **kwargs
) -> dict:
    """Poll the status until it is one of `wanted`; fails early on another final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = (await client.get(f"/api/v1/deployments/{deployment_id}/status", **kwargs)).json()
        if status["status"] in wanted:
            return status
        assert status["status"] not in {"failed", "stopped"}, json.dumps(status)
        assert time.monotonic() < deadline, f"still {status['status']} after {timeout_s} s: {status}"
        await asyncio.sleep(0.2)


async def read_events(
    client: httpx.AsyncClient, deployment_id: str, until, timeout_s: float = 30, **kwargs
) -> list[tuple[str, dict]]:
    """(event, data) pairs of the log stream until `until(events)` is true or the stream ends."""
    events: list[tuple[str, dict]] = []
    name = None
    async with asyncio.timeout(timeout_s):
        async with client.stream("GET", f"/api/v1/deployments/{deployment_id}/logs/stream", **kwargs) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    if until(events):
                        break
    return events


def log_contents(events: list[tuple[str, dict]]) -> list[str]:
    return [data["content"] for name, data in events if name == "log"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- the lifecycle -----------------------------------------------------------------------------------------------


async def test_deploy_goes_active_serves_streams_logs_and_stops(
    deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    async with running_agent(deploy_settings), httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
        response = await client.post(
            "/api/v1/deploy", json={"model_id": "sim-lifecycle", "user_id": "user123", "api_name": "My API"}
        )
        assert response.status_code == 200, response.text
        created = response.json()
        assert created["status"] == "queued" and created["model_id"] == "sim-lifecycle"
        deployment_id = created["deployment_id"]
        assert created["monitor_url"] == f"{deploy_api.base_url}/api/v1/deployments/{deployment_id}/status"

        status = await wait_status(client, deployment_id, {"active"})
        assert set(status) >= {
            "status",
            "deployment_id",
            "model_id",
            "container_id",
            "api_url",
            "created_at",
            "updated_at",
        }
        assert status["api_url"] == deploy_api.base_url and status["user_id"] == "user123"
        assert time.strptime(status["created_at"], "%Y-%m-%dT%H:%M:%S")
        # The container is the worker that registered, and it serves the model through this API.
        health = (await client.get("/health")).json()
        assert "sim-lifecycle" in health["models"]
        completion = await client.post(
            "/v1/completions", json={"model": "sim-lifecycle", "prompt": "w5 w6", "max_tokens": 3}
        )
        assert completion.status_code == 200, completion.text
        listed = (await client.get("/api/v1/deployments")).json()["data"]
        assert [item["deployment_id"] for item in listed].count(deployment_id) == 1

        # History (lines from before we connected) first, then metadata about the live process.
        events = await read_events(
            client,
            deployment_id,
            lambda seen: any("[agent] active" in data.get("content", "") for _, data in seen),
            params={"timestamps": "true"},
        )
        assert events[0] == (
            "deployment_info",
            {
                "deployment_id": deployment_id,
                "model_id": "sim-lifecycle",
                "status": "active",
                "container_id": status["container_id"],
            },
        )
        name, metadata = events[1]
        assert name == "metadata" and metadata["is_running"] is True
        assert metadata["cpu_usage"].endswith("%") and " / " in metadata["memory_usage"]
        pid = metadata["pid"]
        assert psutil.Process(pid).is_running()
        contents = log_contents(events)
        assert contents[0].startswith("[agent] starting: inferq worker --model sim-lifecycle")
        assert any(line.startswith("{") and "worker" in line for line in contents)  # the worker's own JSON logs
        logs = [data for name, data in events if name == "log"]
        assert all(data["timestamp"].endswith("Z") for data in logs)

        stopped = await client.delete(f"/api/v1/deployments/{deployment_id}")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        assert gone(pid)
        # A stopped deployment's stream replays its history and ends with the last line.
        ended = await read_events(client, deployment_id, lambda seen: False)
        assert log_contents(ended)[-1] == "[agent] stopped"
        assert all("timestamp" not in data for name, data in ended if name == "log")  # timestamps=false
        assert (await client.delete(f"/api/v1/deployments/{deployment_id}")).json()["status"] == "stopped"


async def test_a_worker_that_dies_fails_the_deployment_with_the_reason(
    deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    async with running_agent(deploy_settings), httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
        deployment_id = (await client.post("/api/v1/deploy", json={"model_id": "sim-dies"})).json()["deployment_id"]
        await wait_status(client, deployment_id, {"active"})
        events = await read_events(client, deployment_id, lambda seen: any(name == "metadata" for name, _ in seen))
        os.kill(events[-1][1]["pid"], signal.SIGKILL)
        status = await wait_status(client, deployment_id, {"failed"})
        assert status["error"] == "the worker was killed" or status["error"].startswith("the worker was killed:")


async def test_a_model_that_does_not_resolve_fails_with_the_reason(
    deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    async with running_agent(deploy_settings), httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
        created = await client.post("/api/v1/deploy", json={"model_id": "/nonexistent/model.gguf"})
        assert created.status_code == 200
        status = await wait_status(client, created.json()["deployment_id"], {"failed"})
        assert "'/nonexistent/model.gguf' does not exist" in status["error"]


@pytest.mark.parametrize("model_id", ["Model With Spaces", "", "a//b", "org/name/extra", "../" * 200])
async def test_invalid_model_ids_are_refused_in_the_seed_shape(deploy_api: ApiServer, model_id: str) -> None:
    async with httpx.AsyncClient(base_url=deploy_api.base_url) as client:
        before = len((await client.get("/api/v1/deployments")).json()["data"])
        response = await client.post("/api/v1/deploy", json={"model_id": model_id, "user_id": "u", "api_name": "a"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"}
        assert error["type"] == "deployment_error" and error["code"] == 400
        assert error["message"].startswith("Deployment failed: ")
        assert len((await client.get("/api/v1/deployments")).json()["data"]) == before  # nothing was created


async def test_without_an_agent_the_deploy_fails_in_the_seed_shape(deploy_api: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=deploy_api.base_url) as client:
        response = await client.post("/api/v1/deploy", json={"model_id": "sim-nobody"})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "deployment_error"
        assert "no deployment agent" in response.json()["error"]["message"]
        failed = [
            item
            for item in (await client.get("/api/v1/deployments")).json()["data"]
            if item["model_id"] == "sim-nobody"
        ]
        assert [item["status"] for item in failed] == ["failed"]
        # Its log stream does not hang: the edge wrote the last line itself.
        events = await read_events(client, failed[0]["deployment_id"], lambda seen: False)
        assert log_contents(events)[-1].startswith("[api] failed: no deployment agent")


async def test_each_deploy_command_reaches_exactly_one_of_several_agents(
    deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    received: list[str] = []
    async with running_agent(deploy_settings) as first, running_agent(deploy_settings) as second:
        for agent in (first, second):
            take = agent._take

            async def counted(command, agent=agent, take=take):
                received.append(agent.agent_id)
                return await take(command)

            agent._take = counted
        async with httpx.AsyncClient(base_url=deploy_api.base_url, timeout=30) as client:
            ids = [
                (await client.post("/api/v1/deploy", json={"model_id": f"/nonexistent/{n}.gguf"})).json()[
                    "deployment_id"
                ]
                for n in range(6)
            ]
            for deployment_id in ids:
                await wait_status(client, deployment_id, {"failed"})
    assert len(received) == len(ids)  # one delivery per command, over both agents


async def test_log_stream_keeps_the_configured_history(deploy_settings: Settings) -> None:
    async with connect(deploy_settings.nats_url, name="test") as nc:
        await Agent.open(nc, deploy_settings)  # ensures the stream
        info = await nc.jetstream().stream_info(subjects.DEPLOY_LOG_STREAM)
    assert info.config.max_msgs_per_subject == deploy_settings.deploy_log_history


# --- ownership and roles ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deploy_api_auth(deploy_settings: Settings) -> Iterator[ApiServer]:
    keys = [f"client:{CLIENT_A}", f"client:{CLIENT_B}", f"monitor:{MONITOR}", f"admin:{ADMIN}"]
    server = ApiServer(
        deploy_settings.model_copy(
            update={"auth": "on", "api_keys": keys, "deploy_client_models": CATALOGUE, "deploy_max_per_owner": 1}
        )
    ).start()
    yield server
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_deployments_belong_to_their_creator_and_others_see_a_tenant_view_of_logs(
    deploy_api_auth: ApiServer, deploy_settings: Settings
) -> None:
    async with (
        running_agent(deploy_settings),
        httpx.AsyncClient(base_url=deploy_api_auth.base_url, timeout=60) as client,
    ):
        created = await client.post("/api/v1/deploy", json={"model_id": "sim-owned"}, headers=bearer(CLIENT_A))
        assert created.status_code == 200, created.text
        deployment_id = created.json()["deployment_id"]
        try:
            await wait_status(client, deployment_id, {"active"}, headers=bearer(CLIENT_A))
            status_path = f"/api/v1/deployments/{deployment_id}/status"
            other = await client.get(status_path, headers=bearer(CLIENT_B))
            assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
            assert (
                await client.delete(f"/api/v1/deployments/{deployment_id}", headers=bearer(CLIENT_B))
            ).status_code == 404
            assert (
                await client.get(f"/api/v1/deployments/{deployment_id}/logs/stream", headers=bearer(CLIENT_B))
            ).status_code == 404
            listed_b = (await client.get("/api/v1/deployments", headers=bearer(CLIENT_B))).json()["data"]
            assert deployment_id not in [item["deployment_id"] for item in listed_b]
            listed_a = (await client.get("/api/v1/deployments", headers=bearer(CLIENT_A))).json()["data"]
            assert deployment_id in [item["deployment_id"] for item in listed_a]
            # Monitors read every deployment, but cannot deploy or stop.
            assert (await client.get(status_path, headers=bearer(MONITOR))).json()["status"] == "active"
            assert (
                await client.post("/api/v1/deploy", json={"model_id": "sim-spare"}, headers=bearer(MONITOR))
            ).status_code == 403
            assert (
                await client.delete(f"/api/v1/deployments/{deployment_id}", headers=bearer(MONITOR))
            ).status_code == 403

            # Client B's traffic, served by client A's worker (the only one of the model).
            served = await client.post(
                "/v1/completions",
                headers=bearer(CLIENT_B),
                json={"model": "sim-owned", "prompt": "w1 w2", "max_tokens": 2},
            )
            assert served.status_code == 200, served.text
            b_request = served.json()["id"]

            raw = await _history(client, deployment_id, ADMIN)
            assert any(b_request in line for line in raw)  # the worker did log client B's request
            assert any(deploy_settings.nats_url in line for line in raw)
            for key in (CLIENT_A, MONITOR):
                shown = await _history(client, deployment_id, key)
                assert shown and shown[0].startswith("[agent] starting: inferq worker --model sim-owned")
                assert any('"event": "worker.ready"' in line for line in shown)  # the worker's own news stays
                leaked = [
                    line
                    for line in shown
                    if b_request in line
                    or "request_id" in line
                    or "prompt_tokens" in line
                    or "nats://" in line
                    or "127.0.0.1" in line
                    or sys.prefix in line
                ]
                assert not leaked, leaked

            # One deployment at a time for a client (INFERQ_DEPLOY_MAX_PER_OWNER=1 here); admins have no quota.
            second = await client.post("/api/v1/deploy", json={"model_id": "sim-spare"}, headers=bearer(CLIENT_A))
            assert second.status_code == 403 and "quota" in second.json()["error"]["message"]
        finally:
            await client.delete(f"/api/v1/deployments/{deployment_id}", headers=bearer(CLIENT_A))


async def _history(client: httpx.AsyncClient, deployment_id: str, key: str) -> list[str]:
    """The log lines a caller is shown of a deployment's kept history (read until the stream goes quiet)."""
    lines: list[str] = []
    try:
        await read_events(
            client,
            deployment_id,
            lambda seen: lines.__setitem__(slice(None), log_contents(seen)) or False,
            timeout_s=4,
            headers=bearer(key),
        )
    except TimeoutError:
        pass
    return lines


@pytest.mark.parametrize(
    "model_id",
    [
        "/etc/passwd",
        "/nonexistent/model.gguf",
        "/root",
        "~/models",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sim-not-in-catalogue",
    ],
)
async def test_clients_deploy_only_catalogue_models_and_learn_nothing_of_the_filesystem(
    deploy_api_auth: ApiServer, model_id: str
) -> None:
    async with httpx.AsyncClient(base_url=deploy_api_auth.base_url, timeout=30) as client:
        before = (await client.get("/api/v1/deployments", headers=bearer(ADMIN))).json()["data"]
        refused = await client.post("/api/v1/deploy", json={"model_id": model_id}, headers=bearer(CLIENT_B))
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == {
            "message": "Deployment failed: clients may deploy only the catalogue's models: sim-owned, sim-spare",
            "type": "deployment_error",
            "code": 403,
        }  # the same words whatever the path: nothing was looked up
        over_ssh = await client.post(
            "/api/v1/deploy",
            headers=bearer(CLIENT_B),
            json={"model_id": "sim-owned", "ssh_config": {"host": "10.0.0.1", "username": "u", "password": "p"}},
        )
        assert over_ssh.status_code == 403 and "only admins" in over_ssh.json()["error"]["message"]
        after = (await client.get("/api/v1/deployments", headers=bearer(ADMIN))).json()["data"]
        assert len(after) == len(before)  # nothing was created


async def test_admins_deploy_paths_and_see_the_reason_in_full(
    deploy_api_auth: ApiServer, deploy_settings: Settings
) -> None:
    async with (
        running_agent(deploy_settings),
        httpx.AsyncClient(base_url=deploy_api_auth.base_url, timeout=30) as client,
    ):
        created = await client.post(
            "/api/v1/deploy", json={"model_id": "/nonexistent/admin.gguf"}, headers=bearer(ADMIN)
        )
        assert created.status_code == 200, created.text
        deployment_id = created.json()["deployment_id"]
        status = await wait_status(client, deployment_id, {"failed"}, headers=bearer(ADMIN))
        assert "'/nonexistent/admin.gguf' does not exist" in status["error"]
        seen_by_monitor = await client.get(f"/api/v1/deployments/{deployment_id}/status", headers=bearer(MONITOR))
        assert "/nonexistent" not in seen_by_monitor.json()["error"]  # a filesystem fact, for admins only
