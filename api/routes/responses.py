"""The OpenAI Responses API: `/v1/responses` and its stored responses."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request

from api.auth.caller import CallerDep
from api.schemas.responses import ResponseRequest
from api.services import ServicesDep
from api.serving.responses import (
    cancel_response,
    create_response,
    delete_response,
    input_items_page,
    owned_response,
    stream_stored,
)

router = APIRouter(tags=["responses"])


@router.post("/v1/responses")
async def create(body: ResponseRequest, services: ServicesDep, request: Request):
    """Create a response (stored unless `store` is false; `stream` for named SSE events; `background` to run
    it after answering, then poll, cancel or stream it from any replica)."""
    return await create_response(body, services, request)


@router.get("/v1/responses/{response_id}")
async def retrieve(
    response_id: str,
    services: ServicesDep,
    caller: CallerDep,
    stream: bool = False,
    starting_after: int = Query(default=-1, ge=-1),
):
    """A stored response; with `stream=true`, a background response's events after `starting_after`,
    replayed and then followed live."""
    if stream:
        return await stream_stored(services, caller, response_id, starting_after)
    return (await owned_response(services, caller, response_id)).response


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(
    response_id: str,
    services: ServicesDep,
    caller: CallerDep,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
) -> dict:
    """The input items of a stored response (OpenAI lists newest first by default)."""
    record = await owned_response(services, caller, response_id)
    return input_items_page(record, order=order, after=after, limit=limit)


@router.delete("/v1/responses/{response_id}")
async def delete(response_id: str, services: ServicesDep, caller: CallerDep) -> dict:
    return await delete_response(services, caller, response_id)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel(response_id: str, services: ServicesDep, caller: CallerDep) -> dict:
    """Cancel a background response (a finished one is returned as it is)."""
    return await cancel_response(services, caller, response_id)
