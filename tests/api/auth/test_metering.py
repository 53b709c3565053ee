"""Token meters: strict while their request runs, charge-only after (work a request leaves behind, such as a
batch, counts against its owner without being refused); a settlement happens once."""

from __future__ import annotations

import pytest

from api.auth.metering import Meter, reservation_size, reserve_for
from api.errors import ApiError
from broker.rate_limits import Verdict, adjust, admit
from contracts import GenerateRequest, SamplingParams
from contracts.accounts import RateLimits, UsageWindows

NOW = 1_700_000_010.0  # 30 s into a minute


class MemoryLimiter:
    """The RateLimiter interface over one in-memory window (the KV version is tested in tests/broker)."""

    def __init__(self) -> None:
        self.windows = UsageWindows()

    async def admit(self, owner: str, limits: RateLimits, now: float, *, requests: int = 0, tokens: int = 0) -> Verdict:
        verdict = admit(self.windows, limits, now, requests=requests, tokens=tokens)
        if verdict.allowed:
            self.windows = verdict.windows
        return verdict

    async def adjust(self, owner: str, now: float, *, minute: int, tokens: int) -> UsageWindows:
        self.windows = adjust(self.windows, now, minute=minute, tokens=tokens)
        return self.windows


def request(prompt_len: int, max_tokens: int | None, n: int = 1) -> GenerateRequest:
    return GenerateRequest(
        request_id="r",
        model="m",
        prompt_token_ids=list(range(prompt_len)),
        reply_subject="x",
        sampling=SamplingParams(max_tokens=max_tokens, n=n),
    )


def test_a_reservation_is_the_prompt_plus_max_tokens_per_candidate() -> None:
    assert reservation_size(request(10, 20, n=2)) == 50
    with pytest.raises(ValueError):  # an unresolved limit would reserve only the prompt (issue 23)
        reservation_size(request(10, None))


async def test_strict_meters_refuse_then_settle_once() -> None:
    limiter = MemoryLimiter()
    meter = Meter(limiter, "key:k", RateLimits(tokens_per_minute=100), clock=lambda: NOW)
    held = await reserve_for(request(10, 60), meter)
    with pytest.raises(ApiError) as refused:
        await reserve_for(request(10, 60), meter)
    assert refused.value.status == 429 and refused.value.retry_after == pytest.approx(30)  # to the end of the minute
    await held.settle(25)
    await held.settle(999)  # ignored: settled already
    assert limiter.windows.minute_tokens == meter.windows.minute_tokens == 25


async def test_after_the_request_the_meter_charges_without_refusing() -> None:
    limiter = MemoryLimiter()
    meter = Meter(limiter, "key:k", RateLimits(tokens_per_minute=100), clock=lambda: NOW)
    meter.finish()
    held = await reserve_for(request(100, 100), meter)  # over the budget: still admitted
    await held.settle(150)
    assert limiter.windows.minute_tokens == 150


async def test_no_meter_no_accounting() -> None:
    held = await reserve_for(request(10, 10), None)
    await held.settle(20)  # nothing to settle against
