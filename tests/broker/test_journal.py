"""The token journal against a real nats-server: interactive token events published on core NATS are kept, and
one request's events replay in order, every edge's and attempt's, then follow live."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from broker import subjects
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.events import publish_event
from broker.journal import JournalFollower, journal_has
from broker.topology import ensure_journal_stream
from contracts import Accepted, ChoiceDelta, End, Heartbeat, Tokens, Usage

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("journal")) as server:
        yield server


def token(request_id: str, attempt: int, seq: int, token_id: int) -> Tokens:
    return Tokens(
        request_id=request_id,
        attempt=attempt,
        seq=seq,
        choices=[ChoiceDelta(text=f" t{token_id}", token_ids=[token_id])],
    )


async def test_one_requests_events_replay_in_order_then_follow_live(server) -> None:
    async with connect(server.url, "journal-test") as nc:
        js = nc.jetstream()
        assert await ensure_journal_stream(js, max_age_s=60, max_bytes=1024**2)
        assert not await journal_has(js, "cmpl-a")
        earlier = [Accepted(request_id="cmpl-a", seq=0, worker_id="w1"), token("cmpl-a", 1, 1, 10)]
        for event in earlier:
            await publish_event(nc, subjects.token_subject("edge1", "cmpl-a"), event)
        await publish_event(nc, subjects.token_subject("edge1", "cmpl-b"), token("cmpl-b", 1, 1, 99))
        # Batch lines' events are not kept.
        await publish_event(nc, subjects.token_subject("edge1", "cmpl-c", journaled=False), token("cmpl-c", 1, 1, 7))
        await nc.flush()
        assert await journal_has(js, "cmpl-a") and not await journal_has(js, "cmpl-c")

        follower = await JournalFollower(js, "cmpl-a").start()
        try:
            replayed = [await asyncio.wait_for(follower.events.get(), 5) for _ in earlier]
            assert replayed == earlier
            # A resubmission by another edge lands on that edge's reply subject: followed all the same.
            later = [
                Accepted(request_id="cmpl-a", attempt=2, seq=0, worker_id="w2", resumed_tokens=1),
                Heartbeat(request_id="cmpl-a", attempt=2, seq=1),
            ]
            for event in later:
                await publish_event(nc, subjects.token_subject("edge2", "cmpl-a"), event)
            assert [await asyncio.wait_for(follower.events.get(), 5) for _ in later] == later
            assert follower.events.empty()  # cmpl-b's event never showed up
        finally:
            await follower.close()


async def test_a_server_without_memory_for_the_journal_still_serves(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "small", max_memory_store="1MB") as small:
        async with connect(small.url, "journal-test") as nc:
            js = nc.jetstream()
            assert not await ensure_journal_stream(js, max_age_s=60, max_bytes=64 * 1024**2)
            assert not await journal_has(js, "cmpl-a")  # resumes then answer 404; nothing fails


def deaf_consumers(monkeypatch: pytest.MonkeyPatch, *, how_many: int, stored_only: bool) -> list[int]:
    """The first `how_many` journal consumers made from here on deliver none of the events stored before them
    (`stored_only`; as one on a replica that lacks them), or nothing at all (as one on a node that died or froze
    under it). Returns a list that grows by one per consumer made."""
    made: list[int] = []
    subscribe = JetStreamContext.subscribe

    async def deaf_subscribe(self, subject, *args, **kwargs):
        made.append(1)
        if len(made) <= how_many:
            if stored_only:
                kwargs.update(deliver_policy=DeliverPolicy.NEW, config=None)
            else:

                async def ignore(msg) -> None:
                    pass

                kwargs["cb"] = ignore
        return await subscribe(self, subject, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "subscribe", deaf_subscribe)
    return made


async def stored_in_journal(js, request_id: str, count: int) -> None:
    """Wait until the journal holds `count` events of the request (core publishes are stored asynchronously)."""
    for _ in range(100):
        info = await js.stream_info(subjects.JOURNAL_STREAM, subjects_filter=subjects.journal_filter(request_id))
        if sum((info.state.subjects or {}).values()) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the journal did not store {count} events of {request_id}")


def finished_request(request_id: str) -> list:
    return [
        Accepted(request_id=request_id, seq=0, worker_id="w1"),
        token(request_id, 1, 1, 10),
        token(request_id, 1, 2, 11),
        End(request_id=request_id, seq=3, usage=Usage(prompt_tokens=1, completion_tokens=2)),
    ]


async def test_stored_events_the_consumer_misses_are_read_from_the_stream_once_and_it_is_made_anew(
    server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos seed 2026, 30 minutes (`keyed2.404.dup`): retried POSTs of a finished request attached to it in the
    journal and their consumers delivered none of its events for a whole queue timeout."""
    made = deaf_consumers(monkeypatch, how_many=1, stored_only=True)
    async with connect(server.url, "journal-test") as nc:
        js = nc.jetstream()
        assert await ensure_journal_stream(js, max_age_s=60, max_bytes=1024**2)
        stored = finished_request("cmpl-missed")
        for event in stored:
            await publish_event(nc, subjects.token_subject("edge1", "cmpl-missed"), event)
        await stored_in_journal(js, "cmpl-missed", len(stored))
        follower = await JournalFollower(js, "cmpl-missed", catch_up_after_s=0.2).start()
        try:
            # before: nothing, ever (the stored events are all it will get: the request has finished)
            assert [await asyncio.wait_for(follower.events.get(), 3) for _ in stored] == stored
            later = Heartbeat(request_id="cmpl-missed", attempt=2, seq=1)
            await publish_event(nc, subjects.token_subject("edge2", "cmpl-missed"), later)
            assert await asyncio.wait_for(follower.events.get(), 3) == later
            await asyncio.sleep(0.5)
            assert follower.events.empty()  # each event once, whichever way it came
            assert len(made) == 2  # the consumer was made anew after the catch-up
        finally:
            await follower.close()


async def test_a_consumer_that_delivers_nothing_at_all_is_read_around(server, monkeypatch) -> None:
    deaf_consumers(monkeypatch, how_many=1000, stored_only=False)
    async with connect(server.url, "journal-test") as nc:
        js = nc.jetstream()
        assert await ensure_journal_stream(js, max_age_s=60, max_bytes=1024**2)
        follower = await JournalFollower(js, "cmpl-deaf", catch_up_after_s=0.2).start()
        try:
            live = finished_request("cmpl-deaf")
            for event in live:
                await publish_event(nc, subjects.token_subject("edge1", "cmpl-deaf"), event)
                await asyncio.sleep(0.1)
            assert [await asyncio.wait_for(follower.events.get(), 3) for _ in live] == live
        finally:
            await follower.close()
