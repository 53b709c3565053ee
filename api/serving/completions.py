"""`POST /v1/completions`: prompts (text, token ids, or lists of either) → queue requests → OpenAI shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request

from api.engine_client import Generation, merge
from api.errors import ApiError
from api.schemas.openai import CompletionRequest
from api.services import Services
from api.serving.generation import (
    ChoiceState,
    build_requests,
    choice_index,
    completion_logprobs,
    new_id,
    prompt_logprobs_body,
    until_disconnected,
    usage_body,
)
from api.streaming import sse_response
from contracts import ErrorCode, Usage


def tokenize_prompts(prompt: str | list, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    return [tokenizer.encode(item) if isinstance(item, str) else list(item) for item in prompt]


def _check_token_ids(prompts: Sequence[list[int]], vocab_size: int) -> None:
    for token_ids in prompts:
        bad = [token for token in token_ids if not 0 <= token < vocab_size]
        if bad:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"prompt token id {bad[0]} is outside the vocabulary "
                           f"(0..{vocab_size - 1})", param="prompt")


async def create_completion(body: CompletionRequest, services: Services, http: Request):
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompts = tokenize_prompts(body.prompt, tokenizer)
    _check_token_ids(prompts, len(tokenizer))
    sampling = body.sampling(max_tokens=body.max_tokens, logprobs=body.logprobs, best_of=body.best_of)
    if body.echo and body.logprobs is not None:
        # Echoed prompt tokens carry logprobs too, which only a prompt forward pass gives.
        sampling = sampling.model_copy(update={"prompt_logprobs": max(sampling.prompt_logprobs or 0, body.logprobs)})
    if body.stream and sampling.num_candidates > sampling.n:
        raise ApiError(ErrorCode.INVALID_REQUEST, "best_of > n cannot be streamed", param="best_of")
    response_id = new_id("cmpl")
    requests = build_requests(services, model, prompts, sampling, response_id)
    generations = await services.engine.submit_all(requests)
    echoes = [tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    first_tokens = [tokenizer.decode(ids[:1]) for ids in prompts]
    if body.stream:
        return sse_response(_stream(body, model.id, response_id, generations, echoes))
    return await until_disconnected(http, _collect(body, model.id, response_id, generations, echoes, first_tokens))


def _header(response_id: str, model: str) -> dict:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model}


async def _collect(body: CompletionRequest, model: str, response_id: str, generations: list[Generation],
                   echoes: list[str], first_tokens: list[str]) -> dict:
    states: dict[int, ChoiceState] = {}
    prompt_logprobs: dict[int, list] = {}
    usages: list[Usage] = []
    async for position, event in merge(generations):
        if event.kind == "end":
            usages.append(event.usage)
            continue
        if event.prompt_logprobs is not None:
            prompt_logprobs[position] = event.prompt_logprobs
        for delta in event.choices:
            index = choice_index(position, delta.index, body.n)
            states.setdefault(index, ChoiceState(index)).add(delta)
    choices = []
    for index in sorted(states):
        state = states[index]
        position = index // body.n
        logprobs = None
        if body.logprobs is not None:
            echoed = prompt_logprobs.get(position, []) if body.echo else []
            logprobs = completion_logprobs([*echoed, *state.logprobs], unscored_token=first_tokens[position])
        choices.append({"index": index, "text": echoes[position] + "".join(state.text), "logprobs": logprobs,
                        "finish_reason": state.finish_reason, "stop_reason": state.stop_reason,
                        "prompt_logprobs": prompt_logprobs_body(prompt_logprobs.get(position))
                        if body.prompt_logprobs is not None else None})
    return {**_header(response_id, model), "choices": choices, "usage": usage_body(usages)}


async def _stream(body: CompletionRequest, model: str, response_id: str, generations: list[Generation],
                  echoes: list[str]) -> AsyncIterator[dict]:
    header = _header(response_id, model)
    usages: list[Usage] = []
    echoed: set[int] = set()
    async for position, event in merge(generations):
        if event.kind == "end":
            usages.append(event.usage)
            continue
        for delta in event.choices:
            index = choice_index(position, delta.index, body.n)
            text = delta.text
            if index not in echoed:
                echoed.add(index)
                text = echoes[position] + text
            logprobs = completion_logprobs(delta.logprobs or []) if body.logprobs is not None else None
            yield {**header, "choices": [{
                "index": index, "text": text, "logprobs": logprobs,
                "finish_reason": delta.finish_reason.value if delta.finish_reason else None,
                "stop_reason": delta.stop_reason}]}
    if body.include_usage:
        yield {**header, "choices": [], "usage": usage_body(usages)}

