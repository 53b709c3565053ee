"""Appending a sampled token to its sequence and deciding whether the sequence ends there: EOS, a stop token, a
stop string (found by the detokenizer), max_tokens or the context, with min_tokens holding all but the last two
off (vLLM's rules)."""

from __future__ import annotations

from contracts import FinishReason, TokenLogprob
from engine_worker.sequence import Sequence

Finish = tuple[FinishReason, str | int | None]  # (finish_reason, stop_reason)


def append_token(
    seq: Sequence, token_id: int, logprob: float | None, entry: TokenLogprob | None, max_model_len: int
) -> Finish | None:
    """Add `token_id` (with its logprob and, when asked for, its logprob entry); returns how the sequence
    finishes if it does with this token."""
    p = seq.params
    seq.token_ids.append(token_id)
    if logprob is not None:
        seq.cumulative_logprob += logprob
    if entry is not None:
        seq.logprobs.append(entry)
    can_stop = seq.num_output_tokens >= p.min_tokens
    is_eos = can_stop and not p.ignore_eos and token_id in seq.eos_token_ids
    is_stop_token = can_stop and (is_eos or token_id in p.stop_token_ids)
    stop_str = seq.detokenizer.append(
        token_id,
        check_stop=seq.num_output_tokens > p.min_tokens,
        decode=not is_stop_token or p.include_stop_str_in_output,
    )
    if is_stop_token:
        return FinishReason.STOP, None if is_eos else token_id
    if stop_str is not None:
        return FinishReason.STOP, stop_str
    if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None
