"""N-gram speculative decoding ("prompt lookup", vLLM's `ngram` method): guess a sequence's next tokens from its
own text, then let one forward pass check all the guesses at once.

The proposer looks for the most recent earlier occurrence of the sequence's last `max_n` tokens (then `max_n - 1`,
down to `min_n`) and proposes the tokens that followed it. Text that repeats itself (code edits, quotes, lists,
a small model that loops) is guessed well; novel text gets no proposal, so costs nothing.

Verification (`num_accepted` and `back_off` below, called by the engine's postprocess): the draft tokens join
their sequence's next token as extra queries of the batched decode attention (model_runner.py), and the sampler
draws a token at every draft position as if decoding normally (same parameters, same seeded randomness per
position). The drafts are kept up to the first one that differs from what the sampler drew, plus the sampler's
own token there. So the output is the one plain decoding would produce, for greedy and seeded sampling alike; a
guess changes only how many tokens one step yields.

Why it pays: a decode step at a small batch is bound by reading the weights, and computing 5 rows costs
about what 1 row costs (on this repo's CPU, 1.1x; on a GPU, less). At large batches the GEMMs are bound by
compute and every rejected draft row is waste, so the engine drafts only while the step has few rows
(`EngineConfig.speculative_max_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine_worker.sequence import Sequence

MAX_DRAFT_BACKOFF = 32  # tokens a sequence decodes without drafts after repeated misses, at most


class Proposer(Protocol):
    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """At most `limit` (>= 1) guesses of the tokens that follow `seq.token_ids`."""
        ...


@dataclass(slots=True)
class NgramIndex:
    """Per-sequence map of each n-gram to the position right after its latest occurrence, built as tokens
    arrive, so a lookup costs O(max_n) whatever the context length."""

    continuations: dict[tuple[int, ...], int] = field(default_factory=dict)
    num_indexed: int = 0  # n-grams ending before this position are registered

    def update(self, token_ids: list[int], min_n: int, max_n: int) -> None:
        # Register n-grams whose continuation is known: those ending at position end-1 < len(token_ids)-1.
        for end in range(max(self.num_indexed, 1), len(token_ids)):
            for n in range(min_n, min(max_n, end) + 1):
                self.continuations[tuple(token_ids[end - n : end])] = end
        self.num_indexed = max(self.num_indexed, len(token_ids))


class NgramProposer:
    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """min(num_tokens, limit) tokens that followed the latest earlier occurrence of the longest matching
        suffix of the sequence (of max_n down to min_n tokens); [] when none occurred before."""
        if seq.ngram_index is None:
            seq.ngram_index = NgramIndex()
        return self.propose_from(seq.token_ids, seq.ngram_index, limit)

    def propose_from(self, token_ids: list[int], index: NgramIndex, limit: int) -> list[int]:
        limit = min(limit, self.num_tokens)
        if limit < 1:
            return []
        index.update(token_ids, self.min_n, self.max_n)
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = index.continuations.get(tuple(token_ids[length - n :]))
            if start is not None:
                # A match that ends near the end is a repeating pattern: continue it past the end.
                draft: list[int] = []
                for source in range(start, start + limit):
                    draft.append(token_ids[source] if source < length else draft[source - length])
                return draft
        return []


def propose_drafts(proposer: Proposer, running: list[Sequence], max_rows: int, max_model_len: int) -> None:
    """Guess draft tokens for every running decode while the step stays small enough to gain from them."""
    decodes = [seq for seq in running if not seq.is_prefill]
    per_seq = max_rows // max(len(decodes), 1) - 1
    for seq in decodes:
        # Never guess past max_tokens or the context: the sampled token after the last draft must fit too.
        limit = min(per_seq, seq.max_tokens - seq.num_output_tokens - 1, max_model_len - seq.num_tokens)
        drafting = limit > 0 and seq.num_tokens >= seq.next_draft_at
        seq.draft_token_ids = proposer.propose(seq, limit)[:limit] if drafting else []


def num_accepted(drafts: list[int], sampled: list[tuple[int, object]]) -> int:
    """Drafts kept: those before the first one the sampler disagrees with. The sampler's own token at that
    position follows them, so the tokens kept are exactly what decoding one at a time would have produced."""
    matched = 0
    while matched < len(drafts) and sampled[matched][0] == drafts[matched]:
        matched += 1
    return matched


def back_off(seq: Sequence, matched: int) -> None:
    """Text the proposer cannot guess (novel or randomly sampled) stops costing verify rows: each step whose
    drafts all miss doubles the pause before the next guess; one hit ends the pause."""
    seq.draft_backoff = 0 if matched else min(2 * seq.draft_backoff or 1, MAX_DRAFT_BACKOFF)
    seq.next_draft_at = seq.num_tokens + seq.draft_backoff
