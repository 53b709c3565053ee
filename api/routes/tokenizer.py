"""Tokenizer surface. vLLM and Aleph Alpha share `/tokenize` and `/detokenize`; the body says which one a
request is (see api/schemas/tokenizer.py). `/v1/...` also answers in the Aphrodite guide's shape."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.schemas.tokenizer import AnyDetokenizeRequest, AnyTokenizeRequest
from api.services import ServicesDep
from api.serving import tokenizer

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize")
async def tokenize(body: AnyTokenizeRequest, services: ServicesDep, request: Request) -> dict:
    """vLLM `{prompt | messages, …}` → `{count, max_model_len, tokens, token_strs}`; Aleph Alpha
    `{model, prompt, tokens, token_ids}` → `{tokens?, token_ids?}`."""
    return await tokenizer.tokenize(body, services, request)


@router.post("/v1/tokenize")
async def tokenize_v1(body: AnyTokenizeRequest, services: ServicesDep, request: Request) -> dict:
    """As `/tokenize`; also accepts `{"text": …}` and adds `token_strings` and `token_count` (Aphrodite guide shape)."""
    return await tokenizer.tokenize(body, services, request, seed_keys=True)


@router.post("/detokenize")
async def detokenize(body: AnyDetokenizeRequest, services: ServicesDep, request: Request) -> dict:
    """vLLM `{tokens}` → `{prompt}`; Aleph Alpha `{model, token_ids}` → `{result}`."""
    return await tokenizer.detokenize(body, services, request)


@router.post("/v1/detokenize")
async def detokenize_v1(body: AnyDetokenizeRequest, services: ServicesDep, request: Request) -> dict:
    """The same as `/detokenize`."""
    return await tokenizer.detokenize(body, services, request)
