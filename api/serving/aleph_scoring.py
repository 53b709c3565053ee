"""Aleph Alpha `/evaluate` and `/embed`. Evaluate is one forward pass on the normal generation path: the
expected completion is appended to the prompt and scored through prompt logprobs (rank 1 = greedy's pick).
Embed is an embed request on the model's queue."""

from __future__ import annotations

import time

from starlette.requests import Request

from api.errors import ApiError
from api.schemas.aleph import AlephEmbedRequest, AlephEvaluateRequest
from api.services import Services
from api.serving.aleph import prompt_token_ids
from api.serving.completion_parts import build_requests, check_token_ids, collect, new_id, until_disconnected
from api.serving.embeddings import collect_embeddings
from contracts import EmbedRequest, ErrorCode, Pooling, SamplingParams


async def evaluate(body: AlephEvaluateRequest, services: Services, http: Request) -> dict:
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompt = prompt_token_ids(body.prompt, tokenizer)
    expected = tokenizer.encode(body.completion_expected, add_special_tokens=False)
    if not prompt:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            "prompt: must not be empty (nothing would predict the first expected token)",
            param="prompt",
        )
    check_token_ids([prompt], len(tokenizer))
    # max_tokens=1: the sampled token is thrown away; what matters is the prompt pass.
    sampling = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
    request_id = new_id("eval")
    [request] = build_requests(services, model, [prompt + expected], sampling, request_id)
    generation = await services.engine.submit(request)
    collected = await until_disconnected(http, collect([generation], 1))
    scored = (collected.prompt_logprobs.get(0) or [])[len(prompt) :]
    if len(scored) != len(expected) or any(entry is None for entry in scored):
        raise ApiError(ErrorCode.INTERNAL, "the worker returned no scores for the expected completion")
    log_probability = sum(entry.logprob for entry in scored)
    greedy = [entry.top[0].token_id if entry.top else entry.token_id for entry in scored]
    result = {
        "log_probability": log_probability,
        "log_perplexity": -log_probability,
        "log_perplexity_per_token": -log_probability / len(expected),
        "log_perplexity_per_character": -log_probability / len(body.completion_expected),
        "correct_greedy": all(entry.rank == 1 for entry in scored),
        "token_count": len(expected),
        "character_count": len(body.completion_expected),
        "completion": tokenizer.decode(greedy),
    }
    return {
        "id": request_id,
        "model_version": model.id,
        "message": None,
        "result": result,
        "num_tokens_prompt_total": len(prompt) + len(expected),
    }


async def embed(body: AlephEmbedRequest, services: Services, http: Request) -> dict:
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompt = prompt_token_ids(body.prompt, tokenizer)
    if not prompt:
        raise ApiError(ErrorCode.INVALID_REQUEST, "prompt: must not be empty", param="prompt")
    check_token_ids([prompt], len(tokenizer))
    request_id = new_id("embed")
    request = EmbedRequest(
        request_id=request_id,
        model=model.id,
        inputs=[prompt],
        layers=body.layers,
        pooling=[Pooling(p) for p in body.pooling] or [Pooling.NONE],
        normalize=body.normalize,
        reply_subject=services.engine.reply_subject(request_id),
        deadline=time.time() + services.settings.queue_timeout_s,
    )
    generation = await services.engine.submit(request)
    vectors, usage = await until_disconnected(http, collect_embeddings(generation))
    embeddings: dict[str, dict[str, list]] = {}
    for vector in vectors:
        embeddings.setdefault(f"layer_{vector.layer}", {})[vector.pooling] = vector.values
    return {
        "model_version": model.id,
        "embeddings": embeddings,
        "tokens": tokenizer.convert_ids_to_tokens(prompt) if body.tokens else None,
        "num_tokens_prompt_total": usage.prompt_tokens,
    }
