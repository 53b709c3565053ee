"""What a step's sampled tokens do to one sequence: the drafts it keeps (up to the first the sampler disagreed
with) and the sampler's own token after them, each appended with its logprob entry until the sequence finishes
(a stop, max_tokens, EOS, or a grammar that is complete). Drafts are verified, never trusted: with greedy or seeded
sampling the output is what plain decoding would have produced."""

from __future__ import annotations

from dataclasses import dataclass

from contracts import FinishReason
from engine_worker.output_builder import OutputBuilder
from engine_worker.sampling_rows import TokenLogprobData
from engine_worker.sequence import Sequence
from engine_worker.speculative import num_accepted
from engine_worker.stopping import Finish, append_token
from engine_worker.structured_decoding import StructuredDecoding


@dataclass(frozen=True, slots=True)
class Accepted:
    finish: Finish | None  # how the sequence ended with these tokens, if it did
    drafts: int  # drafts it carried into the step
    matched: int  # of those, kept


def accept_tokens(
    seq: Sequence,
    sampled: list[tuple[int, TokenLogprobData | None]],
    outputs: OutputBuilder,
    structured: StructuredDecoding,
    max_model_len: int,
) -> Accepted:
    """`sampled`: the sampler's token at each draft position and after the last draft (one per row)."""
    drafts = seq.draft_token_ids
    matched = num_accepted(drafts, sampled)
    finish: Finish | None = None
    for token_id, lp in sampled[: matched + 1]:
        entry = outputs.token_logprob(token_id, lp) if lp is not None and seq.params.logprobs is not None else None
        finish = append_token(seq, token_id, None if lp is None else lp.logprob, entry, max_model_len)
        if finish is None and seq.matcher is not None and structured.advance(seq, token_id):
            finish = FinishReason.STOP, None  # the output is complete: only EOS could follow
        if finish is not None:
            break
    return Accepted(finish, len(drafts), matched)
