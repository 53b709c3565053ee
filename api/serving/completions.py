"""`POST /v1/completions`: prompts (text, token ids, or lists of either) → queue requests → OpenAI shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from api.affinity import explicit_key
from api.auth.caller import get_caller
from api.engine_client import Generation, merge
from api.errors import ApiError
from api.schemas.openai import CompletionRequest
from api.services import Services
from api.serving.generation import (
    build_requests,
    check_token_ids,
    choice_index,
    collect,
    completion_logprobs,
    prompt_logprobs_body,
    until_disconnected,
    usage_body,
)
from api.serving.reattach import NEW, Reattach, reattach_from, start
from api.streaming import sse_response
from api.structured import check_before_queueing
from contracts import ErrorCode, Usage


def tokenize_prompts(prompt: str | list, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    return [tokenizer.encode(item) if isinstance(item, str) else list(item) for item in prompt]


@dataclass(frozen=True, slots=True)
class _Submitted:
    model: str
    response_id: str
    generations: list[Generation]
    echoes: list[str]
    first_tokens: list[str]


async def create_completion(body: CompletionRequest, services: Services, http: Request):
    reattach = reattach_from(http.headers, "cmpl", get_caller(http).owner)
    job = await _submit(body, services, reattach)
    if body.stream:
        return sse_response(
            _stream(body, job.model, job.response_id, job.generations, job.echoes),
            event_ids=reattach.event_ids(job.response_id, generations=len(job.generations)),
        )
    return await until_disconnected(http, _collect(body, job))


async def completion_response(body: CompletionRequest, services: Services) -> dict:
    """The non-streaming response body, without an HTTP request (the batch runner runs each line this way)."""
    return await _collect(body, await _submit(body, services))


async def completion_chunks(body: CompletionRequest, services: Services) -> AsyncIterator[dict]:
    """Submit the request; the chunk objects of its stream (framed as SSE events or WebSocket messages)."""
    job = await _submit(body, services)
    return _stream(body, job.model, job.response_id, job.generations, job.echoes)


async def _submit(body: CompletionRequest, services: Services, reattach: Reattach = NEW) -> _Submitted:
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompts = tokenize_prompts(body.prompt, tokenizer)
    check_token_ids(prompts, len(tokenizer))
    sampling = body.sampling(max_tokens=body.max_tokens, logprobs=body.logprobs, best_of=body.best_of)
    if body.echo and body.logprobs is not None:
        # Echoed prompt tokens carry logprobs too, which only a prompt forward pass gives.
        sampling = sampling.model_copy(update={"prompt_logprobs": max(sampling.prompt_logprobs or 0, body.logprobs)})
    if body.stream and sampling.num_candidates > sampling.n:
        raise ApiError(ErrorCode.INVALID_REQUEST, "best_of > n cannot be streamed", param="best_of")
    await check_before_queueing(body.constraint, body.constraint_param, services.structured_validation)
    response_id = reattach.response_id("cmpl")
    requests = build_requests(services, model, prompts, sampling, response_id, constraint=body.constraint)
    generations = await start(services.engine.routed_by(explicit_key(body)), requests, reattach)
    echoes = [tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    first_tokens = [tokenizer.decode(ids[:1]) for ids in prompts]
    return _Submitted(model.id, response_id, generations, echoes, first_tokens)


def _header(response_id: str, model: str) -> dict:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model}


async def _collect(body: CompletionRequest, job: _Submitted) -> dict:
    echoes, first_tokens = job.echoes, job.first_tokens
    collected = await collect(job.generations, body.n)
    states, prompt_logprobs = collected.choices, collected.prompt_logprobs
    choices = []
    for index in sorted(states):
        state = states[index]
        position = index // body.n
        logprobs = None
        if body.logprobs is not None:
            echoed = prompt_logprobs.get(position, []) if body.echo else []
            logprobs = completion_logprobs([*echoed, *state.logprobs], unscored_token=first_tokens[position])
        choices.append(
            {
                "index": index,
                "text": echoes[position] + "".join(state.text),
                "logprobs": logprobs,
                "finish_reason": state.finish_reason,
                "stop_reason": state.stop_reason,
                "prompt_logprobs": prompt_logprobs_body(prompt_logprobs.get(position))
                if body.prompt_logprobs is not None
                else None,
            }
        )
    return {**_header(job.response_id, job.model), "choices": choices, "usage": usage_body(collected.usages)}


async def _stream(
    body: CompletionRequest, model: str, response_id: str, generations: list[Generation], echoes: list[str]
) -> AsyncIterator[dict]:
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
            yield {
                **header,
                "choices": [
                    {
                        "index": index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": delta.finish_reason.value if delta.finish_reason else None,
                        "stop_reason": delta.stop_reason,
                    }
                ],
            }
    if body.include_usage:
        yield {**header, "choices": [], "usage": usage_body(usages)}
