"""Per-owner rate-limit windows in JetStream KV, changed only by compare-and-swap so every API replica enforces
one shared budget: read the owner's windows, decide, write back expecting the revision read; a replica that
lost the race reads again. Fixed windows: the current UTC minute (requests, tokens) and UTC day (requests).

The window arithmetic is pure (`admit`, `adjust`) and takes `now`, so it is tested without clocks or NATS."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.kv import KeyValue

from broker import kv, subjects
from broker.errors import BrokerUnavailable
from broker.topology import ensure_rate_limits
from contracts.accounts import RateLimits, UsageWindows

log = structlog.get_logger(__name__)
T = TypeVar("T")

MINUTE_S = 60
DAY_S = 86_400
_MAX_ATTEMPTS = 200  # CAS retries before giving up (contention between replicas on one hot key)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of an admission and the windows after it (for the rate-limit headers)."""

    allowed: bool
    windows: UsageWindows
    retry_after_s: float = 0.0
    reason: str = ""


def current(windows: UsageWindows, now: float) -> UsageWindows:
    """The windows as of `now`: counters of a finished minute or day start again from zero."""
    minute, day = int(now // MINUTE_S), int(now // DAY_S)
    update: dict[str, int] = {}
    if windows.minute != minute:
        update |= {"minute": minute, "minute_requests": 0, "minute_tokens": 0}
    if windows.day != day:
        update |= {"day": day, "day_requests": 0}
    return windows.model_copy(update=update) if update else windows


def admit(windows: UsageWindows, limits: RateLimits, now: float, *, requests: int = 0, tokens: int = 0) -> Verdict:
    """Count `requests` and `tokens` if every limit still has room for them, else refuse and say until when."""
    w = current(windows, now)
    minute_left = (w.minute + 1) * MINUTE_S - now
    day_left = (w.day + 1) * DAY_S - now
    checks = (
        (limits.requests_per_day, w.day_requests, requests, day_left, "requests per day"),
        (limits.requests_per_minute, w.minute_requests, requests, minute_left, "requests per minute"),
        (limits.tokens_per_minute, w.minute_tokens, tokens, minute_left, "tokens per minute"),
    )
    for limit, used, wanted, left, what in checks:
        if limit is not None and wanted and used + wanted > limit:
            return Verdict(False, w, retry_after_s=left, reason=f"{limit} {what}")
    return Verdict(
        True,
        w.model_copy(
            update={
                "minute_requests": w.minute_requests + requests,
                "minute_tokens": w.minute_tokens + tokens,
                "day_requests": w.day_requests + requests,
            }
        ),
    )


def adjust(windows: UsageWindows, now: float, *, minute: int, tokens: int) -> UsageWindows:
    """Correct a token reservation made in `minute` by `tokens` (negative: fewer were used). Once that minute is
    over its budget is gone anyway, so only an overrun still counts, against the current minute."""
    w = current(windows, now)
    if w.minute != minute and tokens < 0:
        return w
    return w.model_copy(update={"minute_tokens": max(0, w.minute_tokens + tokens)})


class RateLimiter:
    def __init__(self, bucket: KeyValue):
        self._kv = bucket

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> RateLimiter:
        return cls(await ensure_rate_limits(js, replicas))

    async def admit(
        self,
        owner: str,
        limits: RateLimits,
        now: float,
        *,
        requests: int = 0,
        tokens: int = 0,
        minute_only: bool = False,
    ) -> Verdict:
        """Atomically count the request/tokens against `owner`'s windows, or refuse without counting.
        `minute_only`: the entry is needed only for the current minute, so it expires when the minute ends
        (anything counted by a name anyone may make up, such as a login email, leaves nothing behind)."""

        def decide(windows: UsageWindows) -> tuple[UsageWindows | None, Verdict]:
            verdict = admit(windows, limits, now, requests=requests, tokens=tokens)
            return (verdict.windows if verdict.allowed else None), verdict

        ttl_s = max(1, math.ceil((int(now // MINUTE_S) + 1) * MINUTE_S - now)) + 1 if minute_only else None
        return await self._transact(owner, decide, ttl_s)

    async def adjust(self, owner: str, now: float, *, minute: int, tokens: int) -> UsageWindows:
        def decide(windows: UsageWindows) -> tuple[UsageWindows | None, UsageWindows]:
            adjusted = adjust(windows, now, minute=minute, tokens=tokens)
            return adjusted, adjusted

        return await self._transact(owner, decide)

    async def windows(self, owner: str, now: float) -> UsageWindows:
        windows, _ = await self._read(subjects.rate_limit_key(owner))
        return current(windows, now)

    async def _read(self, key: str) -> tuple[UsageWindows, int]:
        """The stored windows and their revision (0: none stored yet)."""
        found = await kv.read(self._kv, key)
        return (UsageWindows(), 0) if found is None else (UsageWindows.from_bytes(found[0]), found[1])

    async def _transact(
        self, owner: str, decide: Callable[[UsageWindows], tuple[UsageWindows | None, T]], ttl_s: float | None = None
    ) -> T:
        """Read, decide, write expecting the revision read; on a lost race read again. `decide` returns the
        windows to store (None: nothing to write) and the result. `ttl_s`: the entry expires that long after the
        write (a per-message TTL)."""
        key = subjects.rate_limit_key(owner)
        try:
            for attempt in range(_MAX_ATTEMPTS):
                windows, revision = await self._read(key)
                new, result = decide(windows)
                if new is None or new == windows:
                    return result
                try:
                    if revision:
                        # nats-py's public update() takes no TTL; _update() is what its create(msg_ttl=) uses too.
                        await self._kv._update(key, new.to_bytes(), last=revision, msg_ttl=ttl_s)
                    else:
                        await self._kv.create(key, new.to_bytes(), msg_ttl=ttl_s)
                    return result
                except jse.KeyWrongLastSequenceError:
                    # Another replica wrote first; back off a little (jittered) so hot keys do not livelock.
                    await asyncio.sleep(random.uniform(0, 0.001 * math.log2(attempt + 2)))
        except (TimeoutError, nats.errors.Error, jse.APIError) as exc:  # NATS unreachable or reconnecting
            raise BrokerUnavailable(f"the rate-limit store is unavailable: {exc or type(exc).__name__}") from exc
        log.warning("ratelimit.contention", owner=owner, attempts=_MAX_ATTEMPTS)
        raise BrokerUnavailable("the rate-limit store is too contended; retry")
