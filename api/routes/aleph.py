"""Aleph Alpha surface at the root paths the real `aleph-alpha-client` calls (`/version` is in system.py;
`/tokenize` and `/detokenize` in tokenizer.py). Errors use the statuses that client understands."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse

from api.errors import use_aleph_statuses
from api.schemas.aleph import AlephCompleteRequest, AlephEmbedRequest, AlephEvaluateRequest
from api.services import ServicesDep
from api.serving import aleph, aleph_scoring

router = APIRouter(tags=["aleph-alpha"], dependencies=[Depends(use_aleph_statuses)])


@router.post("/complete")
async def complete(
    body: AlephCompleteRequest,
    services: ServicesDep,
    request: Request,
    nice: Annotated[bool, Query(description="Run after requests that are not nice.")] = False,
):
    """Completion; with `"stream": true` an SSE stream of stream_chunk / stream_summary / completion_summary."""
    return await aleph.complete(body, services, request, nice=nice)


@router.post("/evaluate")
async def evaluate(body: AlephEvaluateRequest, services: ServicesDep, request: Request) -> dict:
    """Likelihood of an expected completion: log probability, perplexities, and whether greedy would produce it."""
    return await aleph_scoring.evaluate(body, services, request)


@router.post("/embed")
async def embed(body: AlephEmbedRequest, services: ServicesDep, request: Request) -> dict:
    """Hidden states of the chosen layers, pooled (no pooling: one vector per token), keyed `layer_<i>`."""
    return await aleph_scoring.embed(body, services, request)


@router.get("/models_available")
async def models_available(services: ServicesDep) -> list[dict]:
    """Models with at least one live worker."""
    return await aleph.models_available(services)


@router.get("/models/{model_id:path}/tokenizer", response_class=PlainTextResponse)
async def model_tokenizer(model_id: str, services: ServicesDep) -> str:
    """The model's tokenizer as `tokenizers` JSON (what the client's `tokenizer(model)` loads)."""
    return await aleph.tokenizer_json(services, model_id)
