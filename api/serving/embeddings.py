"""`POST /v1/embeddings`: inputs → one embed request on the model's queue → OpenAI embedding objects.
Pooling (documented in docs/api.md): mean over the last layer's hidden states, L2-normalised."""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Sequence

from starlette.requests import Request

from api.engine_client import Generation
from api.errors import ApiError
from api.schemas.openai import EmbeddingRequest
from api.services import Services
from api.serving.completion_parts import check_token_ids, new_id, until_disconnected, usage_body
from api.serving.completions import tokenize_prompts
from contracts import EmbeddingVector, EmbedRequest, ErrorCode, Usage


def encode_vector(values: Sequence[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


def shorten(values: Sequence[float], dimensions: int | None) -> list[float]:
    """OpenAI's `dimensions`: keep the first N components and re-normalise (Matryoshka-style truncation)."""
    if dimensions is None or dimensions >= len(values):
        return list(values)
    head = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


async def create_embeddings(body: EmbeddingRequest, services: Services, http: Request) -> dict:
    model, generation = await _submit(body, services)
    return await until_disconnected(http, _respond(body, model, generation))


async def embeddings_response(body: EmbeddingRequest, services: Services) -> dict:
    """The response body, without an HTTP request (the batch runner runs each line this way)."""
    return await _respond(body, *await _submit(body, services))


async def _submit(body: EmbeddingRequest, services: Services) -> tuple[str, Generation]:
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    inputs = tokenize_prompts(body.input, tokenizer)
    check_token_ids(inputs, len(tokenizer), param="input")
    for token_ids in inputs:
        if not token_ids:
            raise ApiError(ErrorCode.INVALID_REQUEST, "input: empty strings cannot be embedded", param="input")
        if len(token_ids) > model.max_model_len:
            raise ApiError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"this model's maximum context length is "
                f"{model.max_model_len} tokens, but an input has {len(token_ids)}",
                param="input",
            )
    request_id = new_id("embd")
    request = EmbedRequest(
        request_id=request_id,
        model=model.id,
        inputs=inputs,
        reply_subject=services.engine.reply_subject(request_id),
        deadline=time.time() + services.settings.queue_timeout_s,
    )
    return model.id, await services.engine.submit(request)


async def _respond(body: EmbeddingRequest, model: str, generation: Generation) -> dict:
    vectors, usage = await collect_embeddings(generation)
    data = [
        {
            "object": "embedding",
            "index": vector.input_index,
            "embedding": encode_vector(shorten(vector.values, body.dimensions), body.encoding_format),
        }
        for vector in sorted(vectors, key=lambda v: v.input_index)
    ]
    usage_fields = usage_body([usage])
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": usage_fields["prompt_tokens"], "total_tokens": usage_fields["prompt_tokens"]},
    }


async def collect_embeddings(generation) -> tuple[list[EmbeddingVector], Usage]:
    vectors: list[EmbeddingVector] = []
    usage = Usage()
    async for event in generation:
        if event.kind == "embeddings":
            vectors.extend(event.vectors)
        elif event.kind == "end":
            usage = event.usage
    if not vectors:
        raise ApiError(ErrorCode.INTERNAL, "the worker returned no embeddings")
    return vectors, usage
