"""Token budgets. The middleware opens a `Meter` for the caller of each request (a WebSocket: each connection)
and puts it on the request's state beside the caller; the route's engine client charges it
(`EngineClient.charging`, api/services.py), and the one place every generation passes through
(`EngineClient.submit`) reserves from it. A reservation is
the prompt plus `max_tokens` per candidate (n or best_of; an unset max_tokens is the rest of the context); when
the generation ends it is settled to what was really used (prompt + completion), from whichever replica sees the
end.

A task that outlives its request keeps the meter; once the request is over the meter only charges and never
refuses, so background work counts against its owner's budget without failing. Work that never had a request
(a batch runner, which has only the owner stored with the job) charges `await gate.meter_for_owner(owner)`."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from api.errors import ApiError
from broker.errors import BrokerError
from broker.rate_limits import MINUTE_S, RateLimiter, Verdict
from contracts import EmbedRequest, ErrorCode, GenerateRequest
from contracts.accounts import RateLimits, UsageWindows

log = structlog.get_logger(__name__)
Clock = Callable[[], float]


class Meter:
    def __init__(
        self,
        limiter: RateLimiter,
        owner: str,
        limits: RateLimits,
        windows: UsageWindows | None = None,
        *,
        strict: bool = True,
        clock: Clock = time.time,
    ):
        self._limiter = limiter
        self.owner = owner
        self.limits = limits
        self.windows = windows  # the latest known state, for the response headers
        self.strict = strict
        self._clock = clock

    def finish(self) -> None:
        """The request is over: work it started may go on, charged but never refused."""
        self.strict = False

    async def reserve(self, tokens: int) -> Reservation:
        if self.limits.tokens_per_minute is None or tokens <= 0:
            return Reservation(None, 0, 0)
        now = self._clock()
        minute = int(now // MINUTE_S)
        if not self.strict:
            self.windows = await self._limiter.adjust(self.owner, now, minute=minute, tokens=tokens)
            return Reservation(self, minute, tokens)
        verdict = await self._limiter.admit(self.owner, self.limits, now, tokens=tokens)
        self.windows = verdict.windows
        if not verdict.allowed:
            raise rate_limited(verdict, tokens)
        return Reservation(self, verdict.windows.minute, tokens)

    async def correct(self, minute: int, tokens: int) -> None:
        self.windows = await self._limiter.adjust(self.owner, self._clock(), minute=minute, tokens=tokens)


class Reservation:
    """Tokens held for one generation until `settle` says how many it used."""

    def __init__(self, meter: Meter | None, minute: int, reserved: int):
        self._meter = meter
        self._minute = minute
        self._reserved = reserved

    async def settle(self, used: int) -> None:
        """Replace the reservation by `used`; at most once. Never raises: the response is already complete."""
        meter, self._meter = self._meter, None
        if meter is None or used == self._reserved:
            return
        try:
            await meter.correct(self._minute, used - self._reserved)
        except BrokerError as exc:  # the budget is off by one request's tokens until the minute ends
            log.warning("ratelimit.settle_failed", owner=meter.owner, error=str(exc))


def rate_limited(verdict: Verdict, tokens: int | None = None) -> ApiError:
    message = f"rate limit reached: {verdict.reason}"
    if tokens is not None:
        message += (
            f" (this request reserves {tokens} tokens: the prompt plus max_tokens per choice, and without "
            "max_tokens the rest of the context; a lower max_tokens may fit)"
        )
    return ApiError(ErrorCode.RATE_LIMITED, message + "; retry after the reset", retry_after=verdict.retry_after_s)


def reservation_size(request: GenerateRequest | EmbedRequest) -> int:
    """The prompt plus `max_tokens` per candidate (n, or best_of). The edge resolves an unset `max_tokens` to the
    rest of the context before it gets here (api/serving/completion_parts.with_max_tokens); one still unset is a bug
    that would reserve too little, so it is refused rather than guessed."""
    if isinstance(request, EmbedRequest):
        return sum(len(tokens) for tokens in request.inputs)  # embeddings generate nothing
    sampling = request.sampling
    if sampling.max_tokens is None:
        raise ValueError(f"request {request.request_id}: max_tokens must be resolved before its tokens are reserved")
    return len(request.prompt_token_ids) + sampling.max_tokens * sampling.num_candidates


async def reserve_for(request: GenerateRequest | EmbedRequest, meter: Meter | None) -> Reservation:
    """Hold the request's tokens against `meter`, its caller's budget (nothing without one: auth off)."""
    if meter is None:
        return Reservation(None, 0, 0)
    return await meter.reserve(reservation_size(request))
