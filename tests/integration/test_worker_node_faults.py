"""A worker whose NATS node misbehaves under it keeps serving once the node is back (the chaos run's findings):
frozen with SIGSTOP for longer than a request's timeouts while the worker streams tokens through it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.integration.harness import ApiProcess, WorkerProcess, sim_cluster_settings
from tests.integration.nats_cluster import NatsCluster
from tests.integration.test_cluster import wait_for_workers

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
MODEL = "sim-node-faults"


@pytest.fixture(scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[NatsCluster, ApiProcess, WorkerProcess]]:
    """A 3-node cluster; one sim worker connected to node n1 only (the node the tests freeze), the API to n2, n3."""
    data = tmp_path_factory.mktemp("node-fault-data")
    with NatsCluster(data / "cluster", name="inferq-node-faults") as cluster:
        await cluster.wait_for_jetstream()
        settings = sim_cluster_settings(cluster.urls, data, MODEL, sim_tokens_per_s=200.0)
        worker = WorkerProcess(
            settings.model_copy(update={"data_dir": data / "w", "nats_url": cluster.nodes[0].url}), data / "w.log"
        ).start()
        edge_urls = ",".join(node.url for node in cluster.nodes[1:])
        api = ApiProcess(settings.model_copy(update={"nats_url": edge_urls}), data / "api.log").start()
        try:
            await wait_for_workers(api, [worker], count=1)
            yield cluster, api, worker
        finally:
            api.stop()
            worker.stop()


async def _stream_until(http: httpx.AsyncClient, until: float) -> None:
    """Keep a stream going (tokens flowing through the worker's connection); errors during the fault are fine."""
    number = 0
    while time.monotonic() < until:
        number += 1
        try:
            async with http.stream(
                "POST",
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": f"load {number}",
                    "max_tokens": 200,
                    "ignore_eos": True,
                    "stream": True,
                },
            ) as response:
                async for _ in response.aiter_bytes():
                    pass
        except httpx.HTTPError:
            await asyncio.sleep(0.2)


async def test_a_worker_serves_again_after_its_node_was_frozen(served) -> None:
    cluster, api, worker = served
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        warm = await http.post("/v1/completions", json={"model": MODEL, "prompt": "warm", "max_tokens": 2})
        assert warm.status_code == 200, warm.text
        load = [asyncio.create_task(_stream_until(http, time.monotonic() + 12.0)) for _ in range(8)]
        await asyncio.sleep(2.0)
        cluster.signal_node(0, signal.SIGSTOP)
        try:
            await asyncio.sleep(8.0)
        finally:
            cluster.signal_node(0, signal.SIGCONT)
        await asyncio.gather(*load)
        deadline = time.monotonic() + 60.0
        while True:  # the worker must be back in the registry and answer
            assert worker.proc.poll() is None, worker.log_tail()
            try:
                after = await http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 3}, timeout=10
                )
                if after.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(1.0)
    # and it still reacts to SIGTERM (its loop is not stuck in an await that never ends)
    assert worker.stop(signal.SIGTERM, timeout=40) == 0, worker.log_tail()
