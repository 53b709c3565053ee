"""Affinity routing's broker half: the rendezvous choice (unit), and against a real nats-server the per-worker
subjects on the request stream, drained before the shared one, and taken over when their worker is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker import subjects
from broker.affinity import SubjectTakeover, orphaned_workers, prefix_key, rendezvous_pick, salted_key
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.metrics import queue_backlogs
from broker.topology import QueueLimits, ensure_affine_consumer, ensure_request_queue
from broker.work_queue import Lane, RequestIntake, publish_request
from contracts import GenerateRequest

LIMITS = QueueLimits(100, 60, 60)
KEYS = [salted_key("owner", f"conversation-{i}") for i in range(4000)]


# --- the choice ---------------------------------------------------------------------------------------------------


def test_a_key_goes_to_the_same_worker_whatever_the_order_of_the_list() -> None:
    workers = ["w1", "w2", "w3"]
    for key in KEYS[:200]:
        assert rendezvous_pick(key, workers) == rendezvous_pick(key, list(reversed(workers)))


def test_keys_spread_evenly_over_the_workers() -> None:
    workers = [f"w{i}" for i in range(4)]
    counts = dict.fromkeys(workers, 0)
    for key in KEYS:
        counts[rendezvous_pick(key, workers)] += 1
    assert all(abs(count - len(KEYS) / 4) < 0.1 * len(KEYS) / 4 for count in counts.values()), counts


def test_a_new_worker_takes_about_its_share_and_only_that() -> None:
    """Adding a 4th worker moves ~1/4 of the keys, every one of them to the new worker (a modulo hash would move
    ~3/4 of them, between old workers too)."""
    before = ["w0", "w1", "w2"]
    after = [*before, "w3"]
    moved = [key for key in KEYS if rendezvous_pick(key, before) != rendezvous_pick(key, after)]
    assert all(rendezvous_pick(key, after) == "w3" for key in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 4) < 0.03, len(moved) / len(KEYS)


def test_a_worker_leaving_moves_only_its_own_keys() -> None:
    before = ["w0", "w1", "w2", "w3"]
    after = ["w0", "w1", "w3"]
    for key in KEYS:
        if rendezvous_pick(key, before) != "w2":
            assert rendezvous_pick(key, after) == rendezvous_pick(key, before)


def test_the_same_key_of_two_owners_routes_independently() -> None:
    """Salted per owner: whether two tenants' identical keys share a worker is chance (~1/N), not a rule."""
    workers = [f"w{i}" for i in range(4)]
    same = sum(
        rendezvous_pick(salted_key("tenant-a", f"k{i}"), workers)
        == rendezvous_pick(salted_key("tenant-b", f"k{i}"), workers)
        for i in range(2000)
    )
    assert 0.18 < same / 2000 < 0.32, same
    assert salted_key("a", "k") != salted_key("b", "k")


def test_prefix_keys_depend_on_the_tokens_only() -> None:
    assert prefix_key([1, 2, 3]) == prefix_key((1, 2, 3))
    assert prefix_key([1, 2, 3]) != prefix_key([1, 2, 4])
    assert prefix_key([12, 3]) != prefix_key([1, 23])


def test_no_workers_no_choice() -> None:
    assert rendezvous_pick(KEYS[0], []) is None


# --- on a real server ---------------------------------------------------------------------------------------------


@pytest.fixture
async def nc(batch_nats: EmbeddedNatsServer) -> AsyncIterator:
    """A client of the session's shared test server (tests/conftest.py); every test here uses models of its own."""
    async with connect(batch_nats.url, "test") as client:
        yield client


def make_request(request_id: str, model: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id, model=model, prompt_token_ids=[1, 2], reply_subject=f"inf.tok.e.{request_id}"
    )


async def publish(js, request_id: str, model: str, worker_id: str | None = None) -> None:
    subject = subjects.affine_subject(model, worker_id) if worker_id else None
    assert await publish_request(js, make_request(request_id, model), subject=subject)


async def drain(intake: RequestIntake, want: int, deadline_s: float = 10.0) -> list[str]:
    got: list[str] = []
    deadline = asyncio.get_running_loop().time() + deadline_s
    while len(got) < want and asyncio.get_running_loop().time() < deadline:
        for delivery in await intake.fetch(want - len(got), timeout=0.2):
            await delivery.msg.ack()
            got.append(delivery.request.request_id)
    return got


async def test_own_subject_first_then_the_shared_queue(nc) -> None:
    js = nc.jetstream()
    model = "aff/first"
    await ensure_request_queue(js, model, LIMITS)
    intake = RequestIntake(js, model, await ensure_affine_consumer(js, model, "wa", LIMITS))
    other = RequestIntake(js, model, await ensure_affine_consumer(js, model, "wb", LIMITS))
    await intake.start()
    await other.start()
    await publish(js, "shared-1", model)
    await publish(js, "mine-1", model, "wa")
    await publish(js, "theirs-1", model, "wb")
    await publish(js, "mine-2", model, "wa")
    assert await drain(intake, 2) == ["mine-1", "mine-2"]  # its own, before the older shared request
    assert await drain(intake, 1) == ["shared-1"]
    assert await drain(intake, 1, deadline_s=1.0) == []  # never another worker's own subject while it lives
    assert await drain(other, 1) == ["theirs-1"]
    await intake.stop()
    await other.stop()


async def test_the_shared_subject_and_dedup_are_unchanged_for_direct_publishers(nc) -> None:
    """A direct publisher knows nothing of workers: its request on the shared subject is served as before, and a
    Nats-Msg-Id is deduplicated across the shared and own subjects (one stream)."""
    js = nc.jetstream()
    model = "aff/direct"
    await ensure_request_queue(js, model, LIMITS)
    intake = RequestIntake(js, model, await ensure_affine_consumer(js, model, "wa", LIMITS))
    await intake.start()
    ack = await js.publish(
        subjects.request_subject(model), make_request("direct", model).to_bytes(), headers={"Nats-Msg-Id": "direct"}
    )
    assert not ack.duplicate
    assert (
        await publish_request(js, make_request("direct", model), subject=subjects.affine_subject(model, "wa")) is False
    )
    assert await drain(intake, 2, deadline_s=2.0) == ["direct"]
    await intake.stop()


async def test_a_dead_workers_waiting_requests_are_taken_over_once(nc) -> None:
    """Worker `gone` (its consumer made, never pulled again, as after a SIGKILL) leaves three requests on its own
    subject; two live workers both take it over; each request is delivered to exactly one of them."""
    js = nc.jetstream()
    model = "aff/takeover"
    await ensure_request_queue(js, model, LIMITS)
    await ensure_affine_consumer(js, model, "gone", LIMITS)
    for i in range(3):
        await publish(js, f"left-{i}", model, "gone")
    intakes, takeovers = [], []
    for worker_id in ("wa", "wb"):
        intake = RequestIntake(js, model, await ensure_affine_consumer(js, model, worker_id, LIMITS))
        await intake.start()
        intakes.append(intake)
        takeovers.append(SubjectTakeover(js, intake, model, worker_id, LIMITS))
    assert await orphaned_workers(js, model, {"gone", "wa", "wb"}) == []  # alive: nobody touches its subject
    for takeover in takeovers:
        await takeover.scan(["wa", "wb"])
    assert all(intake.adopted == {subjects.affine_consumer("gone")} for intake in intakes)
    first, second = await asyncio.gather(drain(intakes[0], 3, 3.0), drain(intakes[1], 3, 3.0))
    assert sorted(first + second) == ["left-0", "left-1", "left-2"]
    for takeover in takeovers:  # drained: released
        await takeover.scan(["wa", "wb"])
    assert all(intake.adopted == set() for intake in intakes)
    for intake in intakes:
        await intake.stop()


async def test_a_subject_whose_consumer_is_gone_is_still_taken_over(nc) -> None:
    js = nc.jetstream()
    model = "aff/noconsumer"
    await ensure_request_queue(js, model, LIMITS)
    await publish(js, "stranded", model, "vanished")  # held by the stream, no consumer of its subject at all
    intake = RequestIntake(js, model, await ensure_affine_consumer(js, model, "wa", LIMITS))
    await intake.start()
    await SubjectTakeover(js, intake, model, "wa", LIMITS).scan(["wa"])
    assert await drain(intake, 1) == ["stranded"]
    await intake.stop()


async def test_a_queue_made_before_affinity_is_converged(nc) -> None:
    """An existing deployment's stream (shared subject only) and unfiltered shared consumer are updated in place:
    the stream gains the own subjects, the consumer a filter, and what was queued is still served."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

    js = nc.jetstream()
    model = "aff-legacy"
    stream = subjects.request_stream(model)
    await js.add_stream(
        StreamConfig(name=stream, subjects=[subjects.request_subject(model)], retention=RetentionPolicy.WORK_QUEUE)
    )
    await js.add_consumer(stream, ConsumerConfig(durable_name="engine", ack_policy=AckPolicy.EXPLICIT))
    await publish(js, "queued-before", model)
    await ensure_request_queue(js, model, LIMITS)
    assert (await js.consumer_info(stream, "engine")).config.filter_subject == subjects.request_subject(model)
    intake = RequestIntake(js, model, await ensure_affine_consumer(js, model, "wa", LIMITS))
    await intake.start()
    await publish(js, "mine", model, "wa")
    assert await drain(intake, 2) == ["mine", "queued-before"]
    await intake.stop()


async def test_the_interactive_backlog_counts_the_own_subjects_too(nc) -> None:
    js = nc.jetstream()
    model = "aff-backlog"
    await ensure_request_queue(js, model, LIMITS)
    await ensure_affine_consumer(js, model, "wa", LIMITS)
    await publish(js, "shared", model)
    await publish(js, "own-1", model, "wa")
    await publish(js, "own-2", model, "wa")
    backlogs = {(b.model, b.lane): b.waiting for b in await queue_backlogs(js)}
    assert backlogs[(model, Lane.INTERACTIVE)] == 3
    assert backlogs[(model, Lane.BATCH)] == 0
