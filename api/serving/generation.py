"""Shared by the completion surfaces: context checks, building queue requests, accumulating choices, logprob
shapes (cancelling work when a non-streaming client goes away is api/disconnects.py)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from api.catalog import ServedModel
from api.disconnects import until_disconnected as until_disconnected  # re-exported: the serving modules use it
from api.errors import ApiError
from api.generation import Generation, merge
from api.services import Services
from contracts import LOGPROB_FLOOR, ChoiceDelta, ErrorCode, GenerateRequest, SamplingParams, TokenLogprob, Usage
from contracts.constraints import Constraint


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    if prompt_len == 0:
        raise ApiError(ErrorCode.INVALID_REQUEST, "the prompt is empty", param="prompt")
    if prompt_len >= max_model_len:
        raise ApiError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} tokens",
            param="messages",
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise ApiError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"this model's maximum context length is {max_model_len} tokens, but you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            f"completion); reduce the prompt or max_tokens",
            param="max_tokens",
        )


def check_token_ids(prompts: Sequence[Sequence[int]], vocab_size: int, param: str = "prompt") -> None:
    for token_ids in prompts:
        bad = [token for token in token_ids if not 0 <= token < vocab_size]
        if bad:
            raise ApiError(
                ErrorCode.INVALID_REQUEST,
                f"{param}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                param=param,
            )


def build_requests(
    services: Services,
    model: ServedModel,
    prompts: Sequence[list[int]],
    sampling: SamplingParams,
    base_id: str,
    *,
    priority: int = 0,
    constraint: Constraint | None = None,
) -> list[GenerateRequest]:
    deadline = time.time() + services.settings.queue_timeout_s
    requests = []
    for position, token_ids in enumerate(prompts):
        check_context(len(token_ids), sampling.max_tokens, model.max_model_len)
        request_id = base_id if len(prompts) == 1 else f"{base_id}-{position}"
        requests.append(
            GenerateRequest(
                request_id=request_id,
                model=model.id,
                prompt_token_ids=token_ids,
                sampling=with_max_tokens(sampling, len(token_ids), model.max_model_len),
                reply_subject=services.engine.reply_subject(request_id),
                deadline=deadline,
                priority=priority,
                constraint=constraint,
                cache_salt=services.cache_salt,
            )
        )
    return requests


def with_max_tokens(sampling: SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    """`max_tokens` as the worker will apply it: unset means the rest of the context (as vLLM resolves it, and
    what the engine does anyway). Resolved here so the token budget reserves what the request may really
    generate (api/auth/metering.py), not just its prompt."""
    if sampling.max_tokens is not None:
        return sampling
    return sampling.model_copy(update={"max_tokens": max_model_len - prompt_len})


def finite(logprob: float | None) -> float | None:
    if logprob is None or math.isnan(logprob):
        return None if logprob is None else LOGPROB_FLOOR
    return max(logprob, LOGPROB_FLOOR)


@dataclass(slots=True)
class ChoiceState:
    """Everything one choice accumulated (non-streaming responses are built from it)."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or [])
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason.value
            self.stop_reason = delta.stop_reason


def choice_index(position: int, choice: int, n: int) -> int:
    """Several prompts × n choices share one flat `index`, prompt-major (as OpenAI numbers them)."""
    return position * n + choice


@dataclass(slots=True)
class Collected:
    """What non-streaming responses are built from: each choice by flat index, the usages, prompt logprobs by
    prompt position."""

    choices: dict[int, ChoiceState] = field(default_factory=dict)
    usages: list[Usage] = field(default_factory=list)
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)


async def collect(generations: Sequence[Generation], n: int) -> Collected:
    """Run the generations to their end, accumulating every choice."""
    collected = Collected()
    async for position, event in merge(generations):
        if event.kind == "end":
            collected.usages.append(event.usage)
            continue
        if event.prompt_logprobs is not None:
            collected.prompt_logprobs[position] = event.prompt_logprobs
        for delta in event.choices:
            index = choice_index(position, delta.index, n)
            collected.choices.setdefault(index, ChoiceState(index)).add(delta)
    return collected


def usage_body(usages: Sequence[Usage]) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens the worker's prefix cache held."""
    prompt = sum(usage.prompt_tokens for usage in usages)
    completion = sum(usage.completion_tokens for usage in usages)
    cached = sum(usage.cached_tokens for usage in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_logprobs(entries: Sequence[TokenLogprob | None], unscored_token: str = "") -> dict:
    """The legacy completions shape: parallel lists plus text offsets. A None entry (the first echoed prompt
    token, which nothing predicts) is listed as `unscored_token` with a null logprob."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for entry in entries:
        token = unscored_token if entry is None else entry.token
        tokens.append(token)
        token_logprobs.append(None if entry is None else finite(entry.logprob))
        top_logprobs.append(None if entry is None else {alt.token: finite(alt.logprob) for alt in entry.top} or None)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def prompt_logprobs_body(entries: Sequence[TokenLogprob | None] | None) -> list | None:
    """vLLM's shape: one entry per prompt position (the first is null), keyed by token id."""
    if entries is None:
        return None

    def position(entry: TokenLogprob) -> dict:
        body = {
            str(alt.token_id): {"logprob": finite(alt.logprob), "rank": rank, "decoded_token": alt.token}
            for rank, alt in enumerate(entry.top, start=1)
        }
        body[str(entry.token_id)] = {"logprob": finite(entry.logprob), "rank": entry.rank, "decoded_token": entry.token}
        return body

    return [None if entry is None else position(entry) for entry in entries]


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode())}

    return {
        "content": [
            {**item(entry.token, entry.logprob), "top_logprobs": [item(alt.token, alt.logprob) for alt in entry.top]}
            for entry in entries
        ]
    }
