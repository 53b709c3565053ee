"""A generation request as the engine holds it: a `RequestState` with one `Sequence` per candidate choice (n, or
best_of), each with its own detokenizer, sampling stream and grammar matcher, all starting from the prompt and
any resumed tokens. Choices 1.. copy choice 0's prompt KV (scheduler.py)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from contracts import GenerateRequest
from engine_worker.detokenizer import IncrementalDetokenizer
from engine_worker.sampling_rows import seed_key
from engine_worker.sequence import RequestState, Sequence

if TYPE_CHECKING:
    from engine_worker.constraints import ConstraintMatcher


def new_request_state(
    request: GenerateRequest,
    tokenizer: Any,
    eos_token_ids: frozenset[int],
    max_model_len: int,
    matchers: list[ConstraintMatcher | None],
    cache_keys: list[bytes],
    arrival: int,
    seq_ids: Iterator[int],
) -> RequestState:
    """`arrival`: the engine's admission counter (scheduling order); `seq_ids`: the engine's sequence numbering;
    `matchers`: one per choice (or Nones); `cache_keys`: the prompt's prefix cache keys, shared by the choices."""
    params = request.sampling
    max_tokens = params.max_tokens or max_model_len - len(request.prompt_token_ids)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    context = list(request.prompt_token_ids) + list(request.resume_token_ids)
    seqs = []
    for index in range(params.num_candidates):
        detokenizer = IncrementalDetokenizer(
            tokenizer,
            list(context),
            skip_special_tokens=params.skip_special_tokens,
            stop=tuple(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        seqs.append(
            Sequence(
                seq_id=next(seq_ids),
                request_id=request.request_id,
                index=index,
                token_ids=list(context),
                num_prompt_tokens=len(request.prompt_token_ids),
                num_resume_tokens=len(request.resume_token_ids),
                params=params,
                max_tokens=max_tokens,
                sampling_key=seed_key(seed, index),
                priority=request.priority,
                arrival=arrival,
                eos_token_ids=eos_token_ids,
                detokenizer=detokenizer,
                matcher=matchers[index],
                cache_keys=cache_keys,
            )
        )
    for seq in seqs[1:]:
        seq.parent = seqs[0]
    state = RequestState(request=request, seqs=seqs)
    if params.prompt_logprobs is not None:
        state.prompt_logprobs = [None]
    return state
