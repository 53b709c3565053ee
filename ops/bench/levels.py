"""Measuring one level: `concurrency` closed-loop streams over a list of requests, summarized."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog

from ops.bench.metrics import LevelResult, RequestResult, summarize

log = structlog.get_logger(__name__)


class Target(Protocol):
    name: str

    async def prepare(self, prompts: list[list[int]]) -> None: ...

    async def __call__(self, ids: list[int]) -> RequestResult: ...


Outcome = RequestResult | list[RequestResult]  # one request's result, or a conversation's, turn by turn


class Sender(Protocol):
    """Anything measurable: a name, and one unit of work in (a request, or a whole conversation), its results
    out."""

    name: str

    def __call__(self, work: Any, /) -> Awaitable[Outcome]: ...


async def measure(target: Sender, prompts: Sequence[Any], concurrency: int) -> LevelResult:
    log.info("level started", target=target.name, concurrency=concurrency, requests=len(prompts))
    results, duration = await run_level(target, prompts, concurrency)
    level = summarize(target.name, concurrency, results, duration)
    first_error = next((r.error for r in results if r.error is not None), None)
    log.info(
        "level done",
        target=target.name,
        concurrency=concurrency,
        output_tok_s=round(level.output_throughput, 1),
        ttft_p50_ms=None if level.ttft_ms.p50 is None else round(level.ttft_ms.p50, 1),
        errors=level.errors,
        first_error=first_error,
    )
    return level


async def run_level(
    target: Callable[[Any], Awaitable[Outcome]], prompts: Sequence[Any], concurrency: int
) -> tuple[list[RequestResult], float]:
    """`concurrency` closed-loop streams over all prompts; returns results in prompt order and the wall time.

    Every stream sends its next prompt as soon as its previous response is complete, so at most
    `concurrency` requests are in flight, and the first `concurrency` of them are sent at once. A prompt may
    be a conversation: its stream then sends its turns one after the other.
    """
    pending = iter(enumerate(prompts))  # shared: each free stream takes the next prompt
    results: list[list[RequestResult]] = [[] for _ in prompts]

    async def stream() -> None:
        for index, work in pending:
            outcome = await target(work)
            results[index] = outcome if isinstance(outcome, list) else [outcome]

    start = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(min(concurrency, len(prompts)))))
    duration = time.perf_counter() - start
    done = [result for outcome in results for result in outcome]
    for result in done:
        result.start_s -= start  # targets stamp perf_counter(); reports want time since the level began
    return done, duration
