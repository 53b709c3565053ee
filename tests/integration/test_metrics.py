"""`GET /metrics` against a real nats-server, a sim worker run as `inferq worker` would run it (JSON logs) and the
API: what the scrape counts matches what the completions returned, the worker's series carry its id, the queue
backlog is visible while no worker consumes, and the worker's log lines about a request carry its context."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.registry import WorkerRegistry
from broker.topology import QueueLimits, ensure_request_queue
from broker.work_queue import publish_request
from common.settings import Settings
from contracts import GenerateRequest, SamplingParams
from tests.integration.harness import ApiServer, WorkerProcess, settings_env, wait_healthy
from tests.json_logs import json_log_lines

pytestmark = pytest.mark.asyncio

MODEL = "metrics-sim"
IDLE_MODEL = "metrics-idle"  # a queue nobody consumes


class CliWorker(WorkerProcess):
    """`inferq worker` (python -m ops worker): logging configured from the settings, as in production."""

    def start(self) -> CliWorker:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops", "worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self


@pytest.fixture(scope="module")
def metrics_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("metrics-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def sim_settings(metrics_nats: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        nats_url=metrics_nats.url,
        data_dir=tmp_path_factory.mktemp("metrics-data"),
        engine="sim",
        served_model_name=MODEL,
        sim_tokens_per_s=200.0,
        max_num_seqs=8,
        queue_timeout_s=20.0,
        auth="off",
        log_format="json",
        batch_runner=False,
    )


@pytest.fixture(scope="module")
def sim_worker(sim_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliWorker]:
    process = CliWorker(sim_settings, tmp_path_factory.mktemp("metrics-logs") / "worker.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
async def metrics_api(sim_settings: Settings, sim_worker: CliWorker) -> AsyncIterator[ApiServer]:
    server = ApiServer(sim_settings).start()
    await wait_healthy(server.base_url, sim_worker)
    yield server
    server.stop()


Samples = dict[tuple[str, frozenset], float]


async def scrape(base_url: str) -> Samples:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def worker_value(samples: Samples, name: str, worker_id: str, **labels: str) -> float:
    key = frozenset({"model_name": MODEL, "worker_id": worker_id, **labels}.items())
    return samples.get((name, key), 0.0)


async def answered_value(base_url: str, name: str, worker_id: str, timeout_s: float = 10.0) -> float:
    """The worker's value once a scrape includes its answer (on a busy machine one may miss the scrape window)."""
    key = (name, frozenset({"model_name": MODEL, "worker_id": worker_id}.items()))
    deadline = time.monotonic() + timeout_s
    while key not in (samples := await scrape(base_url)):
        assert time.monotonic() < deadline, f"no {name} from worker {worker_id}"
        await asyncio.sleep(0.1)
    return samples[key]


async def live_worker_ids(nats_url: str, model: str) -> set[str]:
    async with connect(nats_url, "metrics-test") as nc:
        registry = await WorkerRegistry.open(nc.jetstream(), 10.0)
        return {worker.worker_id for worker in await registry.live_workers() if worker.model == model}


async def test_counters_and_histograms_match_the_completions(
    metrics_api: ApiServer,
    sim_settings: Settings,
) -> None:
    [worker_id] = await live_worker_ids(sim_settings.nats_url, MODEL)
    before = await scrape(metrics_api.base_url)
    max_tokens = [3, 4, 5, 6]
    async with httpx.AsyncClient(base_url=metrics_api.base_url, timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/completions", json={"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": n})
                for n in max_tokens
            )
        )
    usages = [response.json()["usage"] for response in responses]
    assert all(response.status_code == 200 for response in responses)
    after = await scrape(metrics_api.base_url)

    def delta(name: str, **labels: str) -> float:
        return worker_value(after, name, worker_id, **labels) - worker_value(before, name, worker_id, **labels)

    assert delta("inferq:generation_tokens_total") == sum(u["completion_tokens"] for u in usages) == sum(max_tokens)
    assert delta("inferq:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("inferq:request_success_total", finished_reason="length") == len(max_tokens)
    assert delta("inferq:request_success_total", finished_reason="stop") == 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"inferq:{histogram}_count") == len(max_tokens), histogram
        assert delta(f"inferq:{histogram}_bucket", le="+Inf") == len(max_tokens), histogram
    # The sim engine emits one token per step: every token after a request's first is one inter-token gap.
    assert delta("inferq:inter_token_latency_seconds_count") == sum(n - 1 for n in max_tokens)
    # A request's end comes after its first token.
    assert delta("inferq:e2e_request_latency_seconds_sum") > delta("inferq:time_to_first_token_seconds_sum") > 0
    assert worker_value(after, "inferq:num_requests_running", worker_id) == 0
    assert ("inferq:num_requests_running", frozenset({"model_name": MODEL, "worker_id": worker_id}.items())) in after


async def read_stream(response: httpx.Response, flowing: asyncio.Event) -> None:
    """Read SSE lines to the end, setting `flowing` at the first data chunk."""
    async for line in response.aiter_lines():
        if line.startswith("data: {"):
            flowing.set()


async def test_running_gauge_counts_a_streaming_request(metrics_api: ApiServer, sim_settings: Settings) -> None:
    [worker_id] = await live_worker_ids(sim_settings.nats_url, MODEL)
    body = {"model": MODEL, "prompt": "w5", "max_tokens": 2000, "stream": True}  # 10 s at 200 tokens/s
    async with httpx.AsyncClient(base_url=metrics_api.base_url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            # Keep reading the stream while scraping. (Breaking out of `aiter_lines()` instead drops the iterator,
            # and its clean-up closes the connection: the edge then cancels the request as "client disconnected"
            # within a few milliseconds, and the gauge rightly reads 0.)
            flowing = asyncio.Event()
            reader = asyncio.create_task(read_stream(response, flowing))
            try:
                await asyncio.wait_for(flowing.wait(), timeout=30)  # tokens are flowing: the request is running
                # A scrape right after the first chunk may still see the request before its first token was
                # counted (or a torch engine's stats before their next hand-over, every 0.1 s): poll a little.
                deadline = time.monotonic() + 5
                while (
                    running := await answered_value(metrics_api.base_url, "inferq:num_requests_running", worker_id)
                ) != 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert not reader.done(), "the stream ended before the scrape: it should run for 10 s"
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    assert running == 1
    # Leaving the stream cancels the generation; it ends as an abort and the gauge drops back.
    deadline = time.monotonic() + 20
    while worker_value(samples := await scrape(metrics_api.base_url), "inferq:num_requests_running", worker_id):
        assert time.monotonic() < deadline, "the cancelled request still counts as running"
        await asyncio.sleep(0.1)
    assert worker_value(samples, "inferq:request_success_total", worker_id, finished_reason="abort") >= 1


async def test_waiting_counts_the_queue_nobody_consumes(metrics_api: ApiServer, sim_settings: Settings) -> None:
    async with connect(sim_settings.nats_url, "metrics-test") as nc:
        js = nc.jetstream()
        await ensure_request_queue(js, IDLE_MODEL, QueueLimits(max_requests=100, max_age_s=600, duplicate_window_s=60))
        for index in range(3):
            await publish_request(
                js,
                GenerateRequest(
                    request_id=f"idle-{index}",
                    model=IDLE_MODEL,
                    prompt_token_ids=[5],
                    reply_subject="inf.tok.x.y",
                    sampling=SamplingParams(max_tokens=1),
                ),
            )
    samples = await scrape(metrics_api.base_url)

    def waiting(model: str, lane: str) -> float:
        return samples[("inferq:num_requests_waiting", frozenset({"model_name": model, "lane": lane}.items()))]

    assert waiting(IDLE_MODEL, "interactive") == 3
    assert waiting(IDLE_MODEL, "batch") == 0
    assert waiting(MODEL, "interactive") == 0  # the sim worker keeps its queue empty


async def test_worker_log_lines_carry_the_request_context(
    metrics_api: ApiServer, sim_worker: CliWorker, sim_settings: Settings
) -> None:
    [worker_id] = await live_worker_ids(sim_settings.nats_url, MODEL)
    async with httpx.AsyncClient(base_url=metrics_api.base_url, timeout=60) as client:
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "w9", "max_tokens": 2})
    request_id = response.json()["id"]
    deadline = time.monotonic() + 10
    while not (lines := _log_lines(sim_worker, request_id)):
        assert time.monotonic() < deadline, sim_worker.log_tail()
        await asyncio.sleep(0.1)
    [finished] = [line for line in lines if line["event"] == "request.finished"]
    assert finished["model"] == MODEL
    assert finished["worker_id"] == worker_id
    assert finished["finish_reason"] == "length" and finished["completion_tokens"] == 2
    assert "trace_id" not in finished  # tracing is off here; tests/integration/test_tracing.py has it on


def _log_lines(worker: CliWorker, request_id: str) -> list[dict]:
    return [line for line in json_log_lines(worker.log_path) if line.get("request_id") == request_id]


async def test_metrics_are_for_monitors_and_admins_when_auth_is_on(
    sim_settings: Settings, metrics_api: ApiServer
) -> None:
    keys = {"monitor": "monitor-key-0123456789", "client": "client-key-0123456789", "admin": "admin-key-0123456789"}
    settings = sim_settings.model_copy(
        update={"auth": "on", "api_keys": [f"{role}:{key}" for role, key in keys.items()]}
    )
    guarded = ApiServer(settings).start()
    try:
        async with httpx.AsyncClient(base_url=guarded.base_url, timeout=30) as client:

            def get(role: str | None) -> Awaitable[httpx.Response]:
                return client.get("/metrics", headers={"Authorization": f"Bearer {keys[role]}"} if role else {})

            assert (await get(None)).status_code == 401
            refused = await get("client")
            assert refused.status_code == 403
            assert refused.json()["error"]["type"] == "permission_error"
            for role in ("monitor", "admin"):
                response = await get(role)
                assert response.status_code == 200, (role, response.text)
                assert f'inferq:num_requests_running{{model_name="{MODEL}"' in response.text
    finally:
        guarded.stop()


# `GET /metrics/cluster` (the web console's Cluster page): the same numbers as `/metrics` for the same workers
# and queues, joined with the registry (slots, heartbeat), and this edge's NATS connection.
async def test_cluster_status_reports_the_numbers_behind_metrics(
    metrics_api: ApiServer, sim_settings: Settings
) -> None:
    [worker_id] = await live_worker_ids(sim_settings.nats_url, MODEL)
    async with httpx.AsyncClient(base_url=metrics_api.base_url, timeout=60) as client:
        for max_tokens in (2, 3, 4):
            response = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "w5", "max_tokens": max_tokens}
            )
            assert response.status_code == 200, response.text
        status = (await client.get("/metrics/cluster")).json()
    samples = await scrape(metrics_api.base_url)  # idle now: both see the same totals

    assert status["object"] == "cluster.status" and status["error"] is None
    assert status["nats"]["state"] == "connected" and status["nats"]["server"].startswith("127.0.0.1:")
    [worker] = [w for w in status["workers"] if w["worker_id"] == worker_id]
    assert worker["model"] == MODEL and worker["capacity"] == 8 and worker["running"] == 0 and worker["free"] == 8
    assert time.time() - worker["last_heartbeat"] < 30
    metrics = worker["metrics"]
    assert metrics["generation_tokens_total"] == worker_value(samples, "inferq:generation_tokens_total", worker_id)
    assert metrics["generation_tokens_total"] >= 9
    assert metrics["prompt_tokens_total"] == worker_value(samples, "inferq:prompt_tokens_total", worker_id)
    assert metrics["ttft_count"] == worker_value(samples, "inferq:time_to_first_token_seconds_count", worker_id)
    assert metrics["ttft_sum"] == pytest.approx(
        worker_value(samples, "inferq:time_to_first_token_seconds_sum", worker_id)
    )
    finished = sum(
        worker_value(samples, "inferq:request_success_total", worker_id, finished_reason=reason)
        for reason in ("stop", "length", "abort")
    )
    assert metrics["requests_total"] == finished >= 3
    queues = {(q["model"], q["lane"]): q["waiting"] for q in status["queues"]}
    assert queues[(MODEL, "interactive")] == 0 and queues[(MODEL, "batch")] == 0
