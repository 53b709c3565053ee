"""Anthropic surface: Messages and its token counter. Errors on these paths are rendered in Anthropic's shape
(api/errors.py picks it by the `/v1/messages` prefix, so auth refusals and body-limit 413s match too). The
`anthropic-version` and `anthropic-beta` headers the SDK sends are accepted; this server has one behaviour."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.schemas.anthropic import MessagesInput, MessagesRequest
from api.services import ServicesDep
from api.serving.messages import count_tokens, create_message

router = APIRouter(tags=["anthropic"])


@router.post("/v1/messages")
async def messages(body: MessagesRequest, services: ServicesDep, request: Request):
    """A message from the conversation (text blocks); with `"stream": true`, Anthropic's named SSE events."""
    return await create_message(body, services, request)


@router.post("/v1/messages/count_tokens")
async def messages_count_tokens(body: MessagesInput, services: ServicesDep) -> dict:
    """How many tokens the conversation takes as a prompt (`input_tokens`), nothing generated."""
    return await count_tokens(body, services)
