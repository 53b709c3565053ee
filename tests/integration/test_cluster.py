"""The multi-machine shape on one host: a 3-node JetStream cluster, two workers and two API processes, each on a
different node, with the default settings (affinity on, docs/routing.md). Requests through either API are served
by either worker, from streams and buckets replicated to all three nodes, and keep being served after a node that
no API uses goes down; both APIs route one key to the same worker.

Which worker served a request is read from the `accepted` event on its token subject (an observer on a third
connection subscribes to `inf.tok.>`): nothing in the HTTP response names the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import nats
import pytest

from broker import subjects
from broker.registry import WorkerRegistry
from common.settings import Settings
from contracts import parse_event
from tests.integration.harness import ApiProcess, WorkerProcess
from tests.integration.nats_cluster import NatsCluster

MODEL = "sim-cluster"
EDGES = ("edge-a", "edge-b")


@dataclass(frozen=True, slots=True)
class Served:
    edge: str
    worker_id: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
async def observer(cluster: NatsCluster) -> AsyncIterator[dict[str, Served]]:
    """request id → (edge, worker) for every request some worker accepted, seen on node n3."""
    await cluster.wait_for_jetstream()
    accepted: dict[str, Served] = {}

    async def on_event(msg) -> None:
        event = parse_event(msg.data)
        if event.kind == "accepted":
            accepted[event.request_id] = Served(edge=msg.subject.split(".")[2], worker_id=event.worker_id)

    nc = await nats.connect(cluster.nodes[2].url)
    await nc.subscribe("inf.tok.>", cb=on_event)
    await nc.flush()
    yield accepted
    await nc.close()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        engine="sim",
        served_model_name=MODEL,
        sim_tokens_per_s=40.0,
        max_num_seqs=2,
        # A worker that misses two renewals is left out of routing (half a TTL): twice the default, as a loaded CI
        # box has delayed renewals by seconds.
        registry_ttl_s=20.0,
        nats_replicas=3,
        queue_timeout_s=20.0,
        worker_silence_timeout_s=3.0,
        log_format="json",
        data_dir=tmp_path_factory.mktemp("inferq-data"),
    )


@pytest.fixture(scope="module")
def workers(
    cluster: NatsCluster, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WorkerProcess]]:
    """Worker 1 on node n1, worker 2 on node n2."""
    logs = tmp_path_factory.mktemp("worker-logs")
    processes = [
        WorkerProcess(
            settings.model_copy(update={"nats_url": cluster.nodes[i].url, "data_dir": logs / f"w{i}"}),
            logs / f"worker{i + 1}.log",
        ).start()
        for i in (0, 1)
    ]
    yield processes
    for process in processes:
        process.stop()


@pytest.fixture(scope="module")
async def apis(
    cluster: NatsCluster,
    settings: Settings,
    observer: dict[str, Served],
    workers: list[WorkerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[list[ApiProcess]]:
    """API process edge-a on node n3, API process edge-b on node n2."""
    logs = tmp_path_factory.mktemp("api-logs")
    servers = [
        ApiProcess(
            settings.model_copy(update={"nats_url": cluster.nodes[node].url, "edge_id": edge}), logs / f"{edge}.log"
        ).start()
        for node, edge in ((2, EDGES[0]), (1, EDGES[1]))
    ]
    try:
        for server in servers:
            await wait_for_workers(server, workers, count=2)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def wait_for_workers(api: ApiProcess, workers: list[WorkerProcess], count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        while True:
            for worker in workers:
                assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
            try:
                response = await http.get("/health")
            except httpx.TransportError:  # the api process is still starting
                response = None
            if response is not None and response.status_code == 200 and response.json()["workers"] == count:
                return
            assert time.monotonic() < deadline, f"{api.base_url}: {response and response.text}"
            await asyncio.sleep(0.2)


def sim_prompt(*numbers: int) -> str:
    """A prompt of sim words. The sim tokenizer knows only `w<N>` (N >= 3): any other word is `<unk>`, so prompts
    like "round 1 request 3" all tokenize alike, and with affinity every one of them went to one worker's subject
    (the other worker got only what overflowed to the shared queue)."""
    return " ".join(f"w{100 + number}" for number in numbers)


async def complete(api: ApiProcess, prompt: str) -> dict:
    """One completion through `api`; returns its body."""
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["text"]
    return body


async def routed_to_own_subjects(api: ApiProcess) -> float:
    """How many requests this API sent to a worker's own subject (its `/metrics`)."""
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        text = (await http.get("/metrics")).text
    prefix = f'inferq:affinity_routed_total{{model_name="{MODEL}"}} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


async def worker_ids_by_pid(cluster: NatsCluster, pids: set[int]) -> dict[int, str]:
    """worker id by pid, once the registry (read on n1: a replica may lag a moment) lists all of `pids`."""
    nc = await nats.connect(cluster.nodes[0].url)
    try:
        registry = WorkerRegistry(await nc.jetstream().key_value(subjects.REGISTRY_BUCKET))
        deadline = time.monotonic() + 20
        while not pids <= set(ids := {info.pid: info.worker_id for info in await registry.live_workers()}):
            assert time.monotonic() < deadline, (pids, ids)
            await asyncio.sleep(0.2)
        return ids
    finally:
        await nc.close()


async def serve_rounds(
    apis: list[ApiProcess], observer: dict[str, Served], expected: set[Served], rounds: int = 6, first_round: int = 0
) -> set[Served]:
    """Concurrent completions through both APIs, round after round, until every (edge, worker) pair in
    `expected` has served one. Every request has a prompt (so a routing key) of its own: rendezvous hashing sends
    each to one of the two workers, and whatever finds its worker's subject full goes to the shared queue."""
    seen: set[Served] = set()
    for round_number in range(first_round, first_round + rounds):
        bodies = await asyncio.gather(
            *(complete(apis[i % 2], sim_prompt(round_number, i, 8 * round_number + i)) for i in range(8))
        )
        ids = {body["id"] for body in bodies}
        await until_observed(observer, ids)
        seen |= {observer[rid] for rid in ids}
        if expected <= seen:
            break
    return seen


async def until_observed(observer: dict[str, Served], request_ids: set[str], timeout: float = 10.0) -> None:
    """Until the observer has seen an `accepted` event of each request (it subscribes on another node)."""
    deadline = time.monotonic() + timeout
    while not request_ids <= set(observer):
        assert time.monotonic() < deadline, request_ids - set(observer)
        await asyncio.sleep(0.05)


async def test_requests_through_either_api_are_served_by_either_worker(
    cluster: NatsCluster, apis: list[ApiProcess], workers: list[WorkerProcess], observer: dict[str, Served]
) -> None:
    ids = await worker_ids_by_pid(cluster, {worker.proc.pid for worker in workers})
    worker_ids = {ids[worker.proc.pid] for worker in workers}
    assert len(worker_ids) == 2
    expected = {Served(edge, worker_id) for edge in EDGES for worker_id in worker_ids}

    seen = await serve_rounds(apis, observer, expected)
    # With affinity, some requests go to a worker's own subject through each API. Which ones do depends on the
    # load at that moment (a request whose worker's own subject has a backlog goes to the shared queue), so an API
    # that has routed none yet serves a few more rounds of new prompts.
    for extra_round in range(6, 12):
        if all([await routed_to_own_subjects(api) > 0 for api in apis]):
            break
        seen |= await serve_rounds(apis, observer, set(), rounds=1, first_round=extra_round)

    assert seen == expected  # every API got answers from every worker, and nothing else served
    for api in apis:  # and with affinity: some requests went to a worker's own subject through each API
        assert await routed_to_own_subjects(api) > 0, api.base_url
    js_nc = await nats.connect(cluster.nodes[1].url)
    try:
        js = js_nc.jetstream()
        for stream in (
            subjects.request_stream(MODEL),
            subjects.batch_stream(MODEL),
            f"KV_{subjects.REGISTRY_BUCKET}",
            f"KV_{subjects.ACCOUNTS_BUCKET}",
        ):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, stream  # leader + 2 peers
    finally:
        await js_nc.close()


async def test_both_apis_route_one_key_to_the_same_worker(
    apis: list[ApiProcess], workers: list[WorkerProcess], observer: dict[str, Served]
) -> None:
    """Rendezvous hashing needs no coordination between edges: one prompt, sent again and again through either
    API (one at a time, so the worker's own subject never holds a backlog), is served by one worker every time."""
    bodies = [await complete(apis[turn % 2], sim_prompt(7, 7, 7)) for turn in range(6)]
    ids = [body["id"] for body in bodies]
    await until_observed(observer, set(ids))
    served = [observer[rid] for rid in ids]
    assert {entry.edge for entry in served} == set(EDGES)
    assert len({entry.worker_id for entry in served}) == 1, served


async def test_requests_still_succeed_after_a_node_without_an_api_dies(
    cluster: NatsCluster, apis: list[ApiProcess], workers: list[WorkerProcess], observer: dict[str, Served]
) -> None:
    ids = await worker_ids_by_pid(cluster, {worker.proc.pid for worker in workers})
    worker_ids = {ids[worker.proc.pid] for worker in workers}

    cluster.stop_node(0)  # n1: worker 1's node; both APIs are elsewhere. Worker 1 reconnects to n2 or n3.

    expected = {Served(edge, worker_id) for edge in EDGES for worker_id in worker_ids}
    seen = await serve_rounds(apis, observer, expected, rounds=10)
    assert seen == expected
    assert all(worker.proc.poll() is None for worker in workers)
