"""WebSocket streaming at the OpenAI paths: send a request object, receive its chunks (the same objects as
SSE), then `[DONE]`; repeat on the same socket. Requests always stream; framing is in api/streaming.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel

from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from api.services import Services, ServicesDep
from api.serving.chat import chat_completion_chunks
from api.serving.completions import completion_chunks
from api.streaming import StartStream, websocket_session

router = APIRouter(tags=["websocket"])
R = TypeVar("R", bound=BaseModel)


@router.websocket("/v1/chat/completions")
async def chat_completions_ws(websocket: WebSocket, services: ServicesDep) -> None:
    await websocket_session(
        websocket,
        _streamed(ChatCompletionRequest, chat_completion_chunks, services),
        max_bytes=services.settings.max_request_bytes,
    )


@router.websocket("/v1/completions")
async def completions_ws(websocket: WebSocket, services: ServicesDep) -> None:
    await websocket_session(
        websocket,
        _streamed(CompletionRequest, completion_chunks, services),
        max_bytes=services.settings.max_request_bytes,
    )


def _streamed(
    schema: type[R], chunks: Callable[[R, Services], Awaitable[AsyncIterator[dict]]], services: Services
) -> StartStream:
    """Parse a message as `schema` with `stream` forced on (a socket always streams) and start it."""

    async def start(payload: dict) -> AsyncIterator[dict]:
        return await chunks(schema.model_validate({**payload, "stream": True}), services)

    return start
