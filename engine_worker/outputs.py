"""What an engine hands the worker: per step a `RequestOutput` for each request with something new, per embed
batch an `EmbedOutput` per request, and now and then its `EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import ChoiceDelta, EmbeddingVector, TokenLogprob, Usage


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta] = field(default_factory=list)  # only choices with new tokens or just finished
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, on the request's first output
    finished: bool = False  # every choice is done
    usage: Usage | None = None  # set when finished


@dataclass(slots=True)
class EmbedOutput:
    """What `Engine.embed()` returns per request: its pooled vectors and how many tokens were read."""

    request_id: str
    vectors: list[EmbeddingVector]
    usage: Usage


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's gauges and counters, taken on the engine thread and handed over with its outputs (nothing
    else reads engine state from another thread). Engines that do not count something leave it None."""

    running: int
    waiting: int
    kv_cache_usage: float | None = None
    preemptions: int | None = None
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    prefix_cache_queries: int | None = None  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int | None = None  # of which found there
