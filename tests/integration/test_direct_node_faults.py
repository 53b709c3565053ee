"""Fire-and-forget requests (durable `inf.results.*` replies, as `examples/nats_client.py --detach` sends them) while
the node leading the results stream is SIGKILLed in a 3-node cluster: every one ends with a finished, stored result
and the undisturbed text. The chaos run of issue #22 left 6 direct publishes without one: a worker that could not
store a request's `accepted` terminated the request, and a request whose events were not stored was handed back
with a nak, which spends one of its 3 deliveries (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from broker import subjects
from broker.connection import connect
from broker.results import StoredResult, read_result
from broker.work_queue import publish_request
from contracts import End, GenerateRequest, SamplingParams
from tests.integration.harness import WorkerProcess, sim_cluster_settings
from tests.integration.nats_cluster import NatsCluster

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
MODEL = "sim-direct-faults"
MAX_TOKENS = 16
ANSWER_WITHIN_S = 90.0  # the ack wait (30 s) twice over and the generation: a hole waits forever


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[NatsCluster, list[WorkerProcess]]]:
    """A 3-node cluster and two sim workers, each given every node's URL; no API: direct publishers need none."""
    data = tmp_path_factory.mktemp("direct-fault-data")
    with NatsCluster(data / "cluster", name="inferq-direct-faults") as cluster:
        await cluster.wait_for_jetstream()
        settings = sim_cluster_settings(cluster.urls, data, MODEL, sim_tokens_per_s=40.0)
        workers = [
            WorkerProcess(settings.model_copy(update={"data_dir": data / f"w{i}"}), data / f"w{i}.log").start()
            for i in range(2)
        ]
        try:
            yield cluster, workers
        finally:
            for worker in workers:
                worker.stop()


def _request(client: str) -> GenerateRequest:
    request_id = f"{client}{uuid.uuid4().hex}"
    return GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=[3 + i for i in range(8)],
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        reply_subject=subjects.results_subject(client, request_id),
    )


def _text(result: StoredResult) -> str:
    return "".join(choice.text for event in result.events if event.kind == "tokens" for choice in event.choices)


async def _answer(js, request: GenerateRequest) -> StoredResult | None:
    """Publish (retried with the same Nats-Msg-Id, so it is queued once) and read until the result is finished."""
    deadline = time.monotonic() + ANSWER_WITHIN_S
    while True:
        try:
            await publish_request(js, request, retry_for_s=30)
            break
        except Exception:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.5)
    while time.monotonic() < deadline:
        try:
            result = await read_result(js, request.reply_subject, wait_s=5)
        except Exception:  # the reader's node down, an election: read again
            await asyncio.sleep(0.5)
            continue
        if result.finished:
            return result
    return None


async def test_every_direct_publish_ends_with_its_result_across_a_node_kill(served) -> None:
    cluster, workers = served
    async with connect(cluster.urls, "direct-publishers") as nc:
        js = nc.jetstream()
        warm = await _answer(js, _request("warm"))  # waits out the workers' start too
        assert warm is not None and isinstance(warm.events[-1], End), [w.log_tail() for w in workers]
        reference = _text(warm)
        leader = (await js.stream_info(subjects.RESULTS_STREAM)).cluster.leader
        outcomes: list[tuple[str, StoredResult | None]] = []

        async def client(name: str, until: float) -> None:
            while time.monotonic() < until:
                request = _request(name)
                outcomes.append((request.request_id, await _answer(js, request)))

        until = time.monotonic() + 12.0
        load = [asyncio.create_task(client(f"c{i}x", until)) for i in range(6)]
        await asyncio.sleep(3.0)
        cluster.kill_node(cluster.node_index(leader))  # the worst node to lose for stored results
        await asyncio.gather(*load)

    unanswered = [request_id for request_id, result in outcomes if result is None]
    assert not unanswered, (len(unanswered), len(outcomes))
    wrong = [
        request_id
        for request_id, result in outcomes
        if not isinstance(result.events[-1], End) or _text(result) != reference
    ]
    assert not wrong, (len(wrong), len(outcomes))
    assert all(worker.proc.poll() is None for worker in workers)
