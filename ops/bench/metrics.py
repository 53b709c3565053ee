"""Per-request measurements and their aggregation into one result per (target, concurrency level)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestResult:
    """One request as its client saw it. Times are seconds; `start_s` is relative to the level's start."""

    start_s: float
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    response_id: str | None = None  # the chunks' `id`: the request id on the token subjects
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each chunk with text
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    turn: int | None = None  # --workload multiturn: the turn of its conversation (1 = the first)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Stats:
    """Milliseconds; None where there were no samples (JSON has no NaN)."""

    mean: float | None
    p50: float | None
    p99: float | None

    @classmethod
    def of_seconds(cls, values: list[float]) -> Stats:
        if not values:
            return cls(None, None, None)
        ms = [v * 1000.0 for v in values]
        return cls(mean=sum(ms) / len(ms), p50=percentile(ms, 50), p99=percentile(ms, 99))


@dataclass(slots=True)
class LevelResult:
    target: str
    concurrency: int
    num_requests: int
    duration_s: float
    completed: int
    errors: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    ttft_ms: Stats
    itl_ms: Stats
    tpot_ms: Stats
    e2e_ms: Stats
    requests: list[RequestResult]
    edge_ms: Stats | None = None  # token event on NATS -> SSE chunk at the client (--observe-nats)
    draft_tokens: int | None = None  # speculative decoding during the level, from the server's /metrics
    accepted_draft_tokens: int | None = None
    # --workload multiturn: TTFT of conversations' first turns and of the later ones (which may hit a cache)
    first_turn_ttft_ms: Stats | None = None
    later_turn_ttft_ms: Stats | None = None
    cached_share: float | None = None  # cached / prompt tokens over the requests whose usage reports cached ones
    prefix_cache_hit_rate: float | None = None  # hits / queries of the server's prefix cache during the level


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def inter_token_latencies(
    times: list[float], tokens_per_chunk: list[int] | None, total_tokens: int | None
) -> list[float]:
    """Per-token latencies from chunk arrival times.

    A chunk may carry several tokens (a server that coalesces under load); its gap is then split evenly over
    them so ITL stays per token. Without per-chunk counts, every chunk is taken to carry an equal share of the
    total, which is exact when they do (one token each, or k each).
    """
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    if tokens_per_chunk is not None:
        per_gap = [float(max(n, 1)) for n in tokens_per_chunk[1:]]
    else:
        per_gap = [total_tokens / len(times) if total_tokens else 1.0] * len(gaps)
    latencies: list[float] = []
    for gap, tokens in zip(gaps, per_gap, strict=True):
        latencies.extend([gap / tokens] * max(1, round(tokens)))
    return latencies


def summarize(target: str, concurrency: int, results: list[RequestResult], duration_s: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    # TPOT: decode time per token after the first, per request (insensitive to how tokens were chunked).
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.ttft_s is not None and r.output_tokens > 1]
    return LevelResult(
        target=target,
        concurrency=concurrency,
        num_requests=len(results),
        duration_s=duration_s,
        completed=len(ok),
        errors=len(results) - len(ok),
        output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_throughput=output_tokens / duration_s if duration_s > 0 else 0.0,
        mean_prompt_tokens=sum(prompt_counts) / len(prompt_counts) if prompt_counts else None,
        mean_output_tokens=output_tokens / len(ok) if ok else None,
        ttft_ms=Stats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=Stats.of_seconds([latency for r in ok for latency in r.itl_s]),
        tpot_ms=Stats.of_seconds(tpot),
        e2e_ms=Stats.of_seconds([r.e2e_s for r in ok]),
        requests=results,
        cached_share=cached_share(ok),
        **turn_ttfts(ok),
    )


def cached_share(results: list[RequestResult]) -> float | None:
    """Share of prompt tokens the server reported as served from its cache (None: it reports nothing)."""
    reported = [r for r in results if r.cached_tokens is not None and r.prompt_tokens]
    prompt = sum(r.prompt_tokens or 0 for r in reported)
    return sum(r.cached_tokens or 0 for r in reported) / prompt if prompt else None


def turn_ttfts(results: list[RequestResult]) -> dict[str, Stats]:
    """TTFT of first turns and of later turns, when the requests belong to conversations."""
    if all(r.turn is None for r in results):
        return {}
    return {
        "first_turn_ttft_ms": Stats.of_seconds([r.ttft_s for r in results if r.turn == 1 and r.ttft_s is not None]),
        "later_turn_ttft_ms": Stats.of_seconds(
            [r.ttft_s for r in results if r.turn is not None and r.turn > 1 and r.ttft_s is not None]
        ),
    }
