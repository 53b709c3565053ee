"""The token journal against a real nats-server: interactive token events published on core NATS are kept, and
one request's events replay in order, every edge's and attempt's, then follow live."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import subjects
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.events import publish_event
from broker.journal import JournalFollower, journal_has
from broker.topology import ensure_journal_stream
from contracts import Accepted, ChoiceDelta, Heartbeat, Tokens

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
