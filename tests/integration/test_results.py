"""Fire-and-forget publishers: a request that names a durable results subject has its answer stored in JetStream,
read back later (nobody listened while it ran), and the answer survives the worker being SIGKILLed mid-way."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import openai
import pytest

from broker import subjects
from broker.connection import connect
from broker.results import StoredResult, read_result
from broker.work_queue import publish_request
from contracts import GenerateRequest, SamplingParams
from tests.integration.harness import WorkerProcess, wait_for_model
from tests.integration.test_nats_client import example
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
SIM_MODEL = "sim-results"


def text_of(result: StoredResult) -> str:
    return "".join(choice.text for event in result.events if event.kind == "tokens" for choice in event.choices)


def completion_tokens(result: StoredResult) -> int:
    return sum(len(choice.token_ids) for event in result.events if event.kind == "tokens" for choice in event.choices)


async def test_detached_request_is_stored_and_read_back_later(api, nats_server) -> None:
    detach = example(nats_server.url, "--detach", "--max-tokens", "8", "Hello there")
    stdout, stderr = await asyncio.to_thread(detach.communicate, timeout=120)
    assert detach.returncode == 0, stderr
    reply_subject = stdout.strip()
    assert subjects.is_durable_reply(reply_subject)

    fetch = example(nats_server.url, "--fetch", reply_subject, "--wait", "60")
    answer, stderr = await asyncio.to_thread(fetch.communicate, timeout=120)
    assert fetch.returncode == 0, stderr
    client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(
        model=TINY_MODEL_NAME, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hello there"}]
    )
    assert answer == chat.choices[0].message.content + "\n"
    assert "8 completion tokens" in stderr

    again = example(nats_server.url, "--fetch", reply_subject)  # stored, not consumed: it can be read again
    assert (await asyncio.to_thread(again.communicate, timeout=60))[0] == answer


async def test_reading_a_subject_nothing_was_stored_on_is_empty_not_a_hang(nats_server, worker) -> None:
    async with connect(nats_server.url, "results-reader") as nc:
        started = time.monotonic()
        result = await read_result(nc.jetstream(), subjects.results_subject("nobody", "nothing"))
        assert not result.events and not result.finished
        assert time.monotonic() - started < 10
        with pytest.raises(ValueError):
            await read_result(nc.jetstream(), "inf.tok.edge.request")


@pytest.fixture
async def sim_settings(base_settings):
    # Slow enough (20 tokens/s) that the kill lands mid-generation.
    return base_settings.model_copy(update={"engine": "sim", "served_model_name": SIM_MODEL, "sim_tokens_per_s": 20.0})


# The kill test waits out the request queue's ack wait on purpose: the killed worker never acked, so the queue
# hands the request to the next worker only after it. Its workers run the queue with 5 s instead of 30 s (no setting
# reaches it) and, as the real values do, report progress on a held request well inside it: 1 s instead of 10 s.
# The sim model's queue is this module's alone, made by these workers with that ack wait.
SHORT_ACK_WAIT = {"broker.topology.REQUEST_ACK_WAIT_S": 5.0, "engine_worker.bridge._HELD_PROGRESS_S": 1.0}


@pytest.fixture
async def sim_worker(api, sim_settings, tmp_path) -> AsyncIterator[WorkerProcess]:
    process = WorkerProcess(sim_settings, tmp_path / "sim-1.log", constants=SHORT_ACK_WAIT).start()
    await wait_for_model(api.base_url, SIM_MODEL, process)
    yield process
    process.stop(signal.SIGKILL)


async def test_detached_answer_survives_the_worker_being_killed(
    api, nats_server, sim_settings, sim_worker, tmp_path
) -> None:
    max_tokens = 80
    request_id = f"ff-{time.monotonic_ns()}"
    reply_subject = subjects.results_subject("crash-test", request_id)
    request = GenerateRequest(
        request_id=request_id,
        model=SIM_MODEL,
        prompt_token_ids=[5, 6, 7],
        reply_subject=reply_subject,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=7),
    )
    async with connect(nats_server.url, "fire-and-forget") as nc:
        js = nc.jetstream()
        await publish_request(js, request)
        partial = StoredResult()
        while completion_tokens(partial) < 5:  # some of the answer is stored, the rest is not yet
            partial = await read_result(js, reply_subject)
        assert not partial.finished and partial.attempt == 1
        sim_worker.stop(signal.SIGKILL)

        replacement = WorkerProcess(sim_settings, tmp_path / "sim-2.log", constants=SHORT_ACK_WAIT).start()
        try:
            # The killed worker never acked: the queue redelivers it after the ack wait (5 s here).
            final = await read_result(js, reply_subject, wait_s=90)
        finally:
            replacement.stop(signal.SIGKILL)
    assert final.finished, replacement.log_tail()
    assert final.attempt == 2 and final.events[-1].kind == "end"
    assert final.events[-1].usage.completion_tokens == max_tokens == completion_tokens(final)
    assert [event.seq for event in final.events] == list(range(len(final.events)))  # nothing of attempt 1 mixed in
    assert text_of(final).startswith(text_of(partial))  # the same seeded answer, started over
