"""The api settles max-deliveries advisories (its lifespan runs the watcher, broker/max_deliveries.py): a direct
publish whose workers all died is answered with a stored `worker_crashed` error, which the example client prints
and exits on, instead of waiting for ever. The dying workers are this test (fetch, never ack, 1 s ack wait)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from broker import subjects, topology
from broker.connection import connect
from broker.topology import QueueLimits, ensure_request_queue, ensure_results_stream
from broker.work_queue import enqueue_request
from tests.broker.test_max_deliveries import ACK_WAIT_S, DyingWorkers, generate
from tests.integration.harness import ApiServer
from tests.integration.test_nats_client import example

pytestmark = pytest.mark.asyncio


@pytest.fixture
def watching_api(base_settings) -> Iterator[ApiServer]:
    """An api of its own (no worker needed): its lifespan made the advisory consumer and runs a watcher."""
    server = ApiServer(base_settings).start()
    yield server
    server.stop()


async def test_the_api_answers_a_direct_publish_whose_workers_all_died(
    watching_api, base_settings, nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "REQUEST_ACK_WAIT_S", ACK_WAIT_S)  # this test's queue only: the api makes none
    model = f"crashy-{uuid.uuid4().hex[:8]}"
    request_id = f"ff-{uuid.uuid4().hex[:8]}"
    reply = subjects.results_subject("crash-it", request_id)
    async with connect(nats_server.url, "dying-workers") as nc:
        js = nc.jetstream()
        await ensure_request_queue(js, model, QueueLimits(100, 600, 60))
        await ensure_results_stream(js, base_settings.results_max_age_s, base_settings.results_max_bytes)
        await enqueue_request(js, generate(model, reply, request_id))
        async with DyingWorkers(nc, model) as workers:
            await workers.die_running_it()
            pulling = asyncio.create_task(workers.keep_pulling())
            try:
                fetch = example(nats_server.url, "--fetch", reply, "--wait", "60")
                _, stderr = await asyncio.to_thread(fetch.communicate, timeout=120)
            finally:
                pulling.cancel()
                await asyncio.gather(pulling, return_exceptions=True)
    assert fetch.returncode == 3, stderr  # the example's "the request failed"
    assert "failed: worker_crashed: the request's workers died 3 times running it" in stderr
    async with httpx.AsyncClient(base_url=watching_api.base_url, timeout=30) as client:
        metrics = (await client.get("/metrics")).text
    assert "inferq:worker_crashed_requests_total{" in metrics
