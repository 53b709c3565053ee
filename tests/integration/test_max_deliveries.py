"""The api settles max-deliveries advisories (its lifespan runs the watcher, broker/max_deliveries.py): a direct
publish whose workers all died is answered with a stored `worker_crashed` error, which the example client prints
and exits on, instead of waiting for ever. First with this test as the dying workers (fetch, never ack, 1 s ack
wait); then with real sim workers SIGKILLed mid-generation three times (the real 30 s ack wait: about 100 s)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from broker import subjects, topology
from broker.connection import connect
from broker.results import StoredResult, read_result
from broker.topology import QueueLimits, ensure_request_queue, ensure_results_stream
from broker.work_queue import enqueue_request
from contracts import ErrorCode, GenerateRequest, SamplingParams
from tests.broker.test_max_deliveries import ACK_WAIT_S, DyingWorkers, generate
from tests.integration.harness import ApiServer, WorkerProcess, wait_for_model
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


SIM_MODEL = "sim-crashing"


def streamed(result: StoredResult) -> int:
    return sum(len(choice.token_ids) for event in result.events if event.kind == "tokens" for choice in event.choices)


async def running_as(js, reply_subject: str, attempt: int, worker: WorkerProcess) -> None:
    """Until `attempt` of the request has stored some tokens (a redelivery comes after the 30 s ack wait)."""
    deadline = time.monotonic() + 120
    while True:
        result = await read_result(js, reply_subject)
        if result.attempt == attempt and streamed(result) > 0:
            return
        assert result.attempt <= attempt and not result.finished, result.events[-1:]
        assert worker.proc.poll() is None, worker.log_tail()
        assert time.monotonic() < deadline, f"attempt {attempt} never ran:\n{worker.log_tail()}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_a_direct_publish_whose_worker_is_sigkilled_three_times_is_answered_worker_crashed(
    watching_api, base_settings, nats_server, tmp_path
) -> None:
    settings = base_settings.model_copy(
        update={"engine": "sim", "served_model_name": SIM_MODEL, "sim_tokens_per_s": 20}
    )
    request_id = f"sigkill-{uuid.uuid4().hex[:8]}"
    reply = subjects.results_subject("sigkill", request_id)
    request = GenerateRequest(
        request_id=request_id,
        model=SIM_MODEL,
        prompt_token_ids=[5, 6, 7],
        reply_subject=reply,
        sampling=SamplingParams(max_tokens=2000, ignore_eos=True),  # 100 s at 20 tokens/s: killed long before
    )
    worker = WorkerProcess(settings, tmp_path / "worker-1.log").start()
    try:
        await wait_for_model(watching_api.base_url, SIM_MODEL, worker)
        async with connect(nats_server.url, "sigkill-publisher") as nc:
            js = nc.jetstream()
            await enqueue_request(js, request)
            for attempt in (1, 2, 3):
                await running_as(js, reply, attempt, worker)
                worker.stop(signal.SIGKILL)
                worker = WorkerProcess(settings, tmp_path / f"worker-{attempt + 1}.log").start()
            # The fourth worker pulls, and is never handed the request; the api answers it instead.
            final = await read_result(js, reply, wait_s=120)
            fourth_alive = worker.proc.poll() is None
    finally:
        worker.stop(signal.SIGKILL)
    assert final.finished, final.events[-1:]
    assert final.attempt == 3 and final.events[-1].kind == "error"
    assert final.events[-1].error.code is ErrorCode.WORKER_CRASHED
    assert fourth_alive, worker.log_tail()  # never handed the request, so never killed by the test
