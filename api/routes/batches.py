"""OpenAI Batch API surface: jobs over an uploaded JSONL file, run in the background by the batch runner."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.auth.caller import CallerDep
from api.batch.records import MAX_PAGE
from api.schemas.batches import BatchCreateRequest
from api.schemas.ids import ResourceId
from api.services import ServicesDep
from api.serving import batches

router = APIRouter(tags=["batches"])


@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest, services: ServicesDep, caller: CallerDep) -> dict:
    """Start a batch over `input_file_id` for `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`."""
    return await batches.create_batch(body, caller, services)


@router.get("/v1/batches")
async def list_batches(
    services: ServicesDep,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
) -> dict:
    """Newest first; page with `after=<last id of the previous page>`."""
    return await batches.list_batches(caller, services, after=after, limit=limit)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: ResourceId, services: ServicesDep, caller: CallerDep) -> dict:
    return await batches.get_batch(batch_id, caller, services)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: ResourceId, services: ServicesDep, caller: CallerDep) -> dict:
    """Stop the batch: queued lines are not run, finished results are kept (status cancelling → cancelled)."""
    return await batches.cancel_batch(batch_id, caller, services)
