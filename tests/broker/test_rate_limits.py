"""Rate-limit windows: the pure arithmetic at fixed times, and the compare-and-swap store against a real server
with many concurrent admissions from separate connections (as separate API replicas would make them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.rate_limits import RateLimiter, adjust, admit, current
from contracts.accounts import RateLimits, UsageWindows

T0 = 1_700_000_000.0 - 1_700_000_000.0 % 86_400 + 3_600.5  # 01:00:00.5 UTC on some day
LIMITS = RateLimits(requests_per_minute=3, tokens_per_minute=100, requests_per_day=5)


def test_requests_count_until_the_minute_limit_then_refuse_until_the_minute_ends() -> None:
    windows = UsageWindows()
    for _ in range(3):
        verdict = admit(windows, LIMITS, T0, requests=1)
        assert verdict.allowed
        windows = verdict.windows
    refused = admit(windows, LIMITS, T0 + 10, requests=1)
    assert not refused.allowed and refused.reason == "3 requests per minute"
    assert refused.retry_after_s == pytest.approx(60 - 10.5)
    assert admit(windows, LIMITS, T0 + 60, requests=1).allowed  # the next minute


def test_the_day_limit_outlasts_minutes() -> None:
    windows = UsageWindows(minute=int(T0 // 60), minute_requests=0, day=int(T0 // 86_400), day_requests=5)
    refused = admit(windows, LIMITS, T0, requests=1)
    assert not refused.allowed and refused.reason == "5 requests per day"
    assert refused.retry_after_s == pytest.approx(86_400 - 3_600.5)


def test_tokens_reserve_then_settle_within_the_minute() -> None:
    reserved = admit(UsageWindows(), LIMITS, T0, tokens=80).windows
    assert not admit(reserved, LIMITS, T0, tokens=30).allowed  # 80 + 30 > 100
    settled = adjust(reserved, T0 + 1, minute=int(T0 // 60), tokens=-60)  # only 20 were used
    assert settled.minute_tokens == 20
    assert admit(settled, LIMITS, T0 + 2, tokens=30).allowed


def test_a_settlement_after_the_minute_only_counts_overruns() -> None:
    reserved = admit(UsageWindows(), LIMITS, T0, tokens=50).windows
    minute = int(T0 // 60)
    assert adjust(reserved, T0 + 60, minute=minute, tokens=-40).minute_tokens == 0
    assert adjust(reserved, T0 + 60, minute=minute, tokens=+7).minute_tokens == 7


def test_current_resets_finished_windows() -> None:
    stale = UsageWindows(minute=1, minute_requests=9, minute_tokens=9, day=0, day_requests=9)
    fresh = current(stale, T0)
    assert (fresh.minute_requests, fresh.minute_tokens, fresh.day_requests) == (0, 0, 0)


@pytest.fixture
async def limiters(server: EmbeddedNatsServer) -> AsyncIterator[list[RateLimiter]]:
    async with connect(server.url, "replica-a") as a, connect(server.url, "replica-b") as b:
        yield [await RateLimiter.open(a.jetstream()), await RateLimiter.open(b.jetstream())]


async def test_concurrent_admissions_from_two_connections_never_exceed_the_limit(limiters) -> None:
    limits = RateLimits(requests_per_minute=7, tokens_per_minute=None, requests_per_day=None)
    now = T0 + 120  # the same fixed window for every attempt
    verdicts = await asyncio.gather(*(limiters[i % 2].admit("key:race", limits, now, requests=1) for i in range(30)))
    assert sum(verdict.allowed for verdict in verdicts) == 7
    assert (await limiters[0].windows("key:race", now)).minute_requests == 7


async def test_adjustments_race_without_losing_updates(limiters) -> None:
    minute = int(T0 // 60)
    await asyncio.gather(*(limiters[i % 2].adjust("key:adjust", T0, minute=minute, tokens=5) for i in range(20)))
    assert (await limiters[1].windows("key:adjust", T0)).minute_tokens == 100
