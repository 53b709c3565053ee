"""One tokenizer service (the tokenizer the model's worker published; no model in the edge) and the response
shapers of the APIs that share its paths: vLLM, the Aphrodite guide's `/v1/tokenize` superset, and Aleph Alpha."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from api.catalog import ServedModel
from api.errors import ApiError, use_aleph_statuses
from api.schemas.aleph import AlephDetokenizeRequest, AlephTokenizeRequest
from api.schemas.tokenizer import DetokenizeRequest, TokenizeRequest
from api.services import Services
from api.serving.chat import render_chat
from api.serving.completion_parts import check_token_ids
from contracts import ErrorCode


async def resolve(services: Services, model_id: str | None) -> tuple[ServedModel, Any]:
    """The named model and its tokenizer; without a name, the one served model (as vLLM, which serves one).
    With several served, guessing would tokenize for the wrong model: the caller must say which."""
    if model_id:
        model = await services.catalog.get(model_id)
    else:
        models = await services.catalog.models()
        if not models:
            raise ApiError(ErrorCode.NO_WORKER, "no model is being served", retry_after=5.0)
        if len(models) > 1:
            names = ", ".join(m.id for m in models)
            raise ApiError(
                ErrorCode.INVALID_REQUEST, f"model: required when several models are served ({names})", param="model"
            )
        model = models[0]
    return model, await services.catalog.tokenizer(model)


async def tokenize(
    body: TokenizeRequest | AlephTokenizeRequest, services: Services, http: Request, *, seed_keys: bool = False
) -> dict:
    """`seed_keys`: also answer in the Aphrodite guide's `{tokens, token_strings, token_count}` shape
    (`/v1/tokenize`)."""
    if isinstance(body, AlephTokenizeRequest):
        use_aleph_statuses(http)
        _, tokenizer = await resolve(services, body.model)
        # Aleph Alpha reports the text's own tokens, without the tokenizer's special tokens.
        return aleph_tokens(
            tokenizer,
            tokenizer.encode(body.prompt, add_special_tokens=False),
            tokens=body.tokens,
            token_ids=body.token_ids,
        )
    model, tokenizer = await resolve(services, body.model)
    if body.messages is not None:
        ids = render_chat(
            body.messages,
            tokenizer,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            add_special_tokens=bool(body.add_special_tokens),
        )
    else:
        ids = tokenizer.encode(body.text_input, add_special_tokens=body.add_special_tokens is not False)
    response = vllm_tokens(
        tokenizer, ids, max_model_len=model.max_model_len, return_token_strs=bool(body.return_token_strs)
    )
    return {**response, **seed_tokens(tokenizer, ids)} if seed_keys else response


async def detokenize(body: DetokenizeRequest | AlephDetokenizeRequest, services: Services, http: Request) -> dict:
    aleph = isinstance(body, AlephDetokenizeRequest)
    if aleph:
        use_aleph_statuses(http)
    ids = body.token_ids if aleph else body.tokens
    _, tokenizer = await resolve(services, body.model)
    check_token_ids([ids], len(tokenizer), param="token_ids" if aleph else "tokens")
    text = tokenizer.decode(ids)  # special tokens kept, so tokenize → detokenize round-trips
    return {"result": text} if aleph else {"prompt": text}


def vllm_tokens(tokenizer, ids: list[int], *, max_model_len: int, return_token_strs: bool) -> dict:
    return {
        "count": len(ids),
        "max_model_len": max_model_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if return_token_strs else None,
    }


def seed_tokens(tokenizer, ids: list[int]) -> dict:
    """The Aphrodite guide's shape: each token decoded on its own (a token holding part of a multi-byte
    character decodes to �)."""
    return {"tokens": ids, "token_strings": [tokenizer.decode([token]) for token in ids], "token_count": len(ids)}


def aleph_tokens(tokenizer, ids: list[int], *, tokens: bool, token_ids: bool) -> dict:
    """Only what was asked for; `tokens` are the vocabulary's token strings (e.g. `ĠHello`)."""
    body: dict = {}
    if tokens:
        body["tokens"] = tokenizer.convert_ids_to_tokens(ids)
    if token_ids:
        body["token_ids"] = ids
    return body
