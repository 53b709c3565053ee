"""OpenAI surface: completions, chat completions, models."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.catalog import ServedModel
from api.errors import ApiError
from api.schemas.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from api.services import ServicesDep
from api.serving.chat import create_chat_completion
from api.serving.completions import create_completion
from api.serving.embeddings import create_embeddings
from contracts import ErrorCode

router = APIRouter(tags=["openai"])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, services: ServicesDep, request: Request):
    """Text completion (OpenAI legacy completions, with vLLM's extra sampling fields)."""
    return await create_completion(body, services, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, services: ServicesDep, request: Request):
    """Chat completion using the model's chat template."""
    return await create_chat_completion(body, services, request)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, services: ServicesDep, request: Request) -> dict:
    """Embeddings from the model's hidden states (mean over the last layer, L2-normalised)."""
    return await create_embeddings(body, services, request)


def model_card(model: ServedModel) -> dict:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "inferq",
        "root": model.root,
        "parent": None,
        "max_model_len": model.max_model_len,
        "permission": [
            {
                "id": f"modelperm-{model.id}",
                "object": "model_permission",
                "created": model.created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


@router.get("/v1/models")
async def list_models(services: ServicesDep) -> dict:
    """Models with at least one live worker."""
    return {"object": "list", "data": [model_card(model) for model in await services.catalog.models()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, services: ServicesDep) -> dict:
    for model in await services.catalog.models():
        if model.id == model_id:
            return model_card(model)
    raise ApiError(ErrorCode.MODEL_NOT_FOUND, f"the model {model_id!r} does not exist", param="model")
