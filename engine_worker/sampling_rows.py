"""What the sampler is asked per row, and what it answers, as plain host data: the engine core builds rows and
reads results without importing torch (sampler.py does the device work). Also the per-choice random stream:
each row's uniform is a hash of (seed, choice index, position), so a seeded choice samples the same token
whatever its batch-mates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_worker.constraints import MaskRow
    from engine_worker.sequence import Sequence

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_key(seed: int, choice_index: int) -> int:
    """The per-choice stream key: choices of one request differ, the same (seed, index) always agrees."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ choice_index)


def row_uniform(key: int, position: int) -> float:
    """A uniform in [0, 1) for sampling the token at `position`; 53 random bits."""
    return (_splitmix64(key ^ _splitmix64(position)) >> 11) / float(1 << 53)


@dataclass(slots=True)
class SamplingRow:
    """Host-side parameters of one sampled row (one sequence this step)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    suppress_ids: tuple[int, ...] = ()  # stop tokens while below min_tokens
    key: int = 0
    position: int = 0  # index of the token being sampled
    output_ids: list[int] = field(default_factory=list)  # for frequency/presence
    context_ids: list[int] = field(default_factory=list)  # prompt + output, for repetition
    num_logprobs: int | None = None  # None: no logprobs; 0: only the sampled token's
    need_logprob: bool = False  # the sampled token's logprob is needed (best_of ranking)
    allowed: MaskRow | None = None  # structured output: the allowed tokens (a packed bitmask, maybe still filling)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def wants_logprobs(self) -> bool:
        return self.num_logprobs is not None or self.need_logprob


@dataclass(slots=True)
class TokenLogprobData:
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


def row_for(seq: Sequence, drafted: list[int]) -> SamplingRow:
    """How to sample the token after the sequence's tokens and the first `drafted` of its drafts."""
    p = seq.params
    num_output_tokens = seq.num_output_tokens + len(drafted)
    row = SamplingRow(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else 0,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=p.logit_bias,
        key=seq.sampling_key,
        position=seq.num_tokens + len(drafted),
        num_logprobs=p.logprobs,
        need_logprob=p.num_candidates > p.n,
    )
    if num_output_tokens < p.min_tokens:
        row.suppress_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(seq.eos_token_ids))
    if row.has_penalties:
        row.output_ids = seq.output_token_ids + drafted
        row.context_ids = seq.token_ids + drafted
    return row
