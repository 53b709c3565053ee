"""OpenAI Files surface (uploads for the Batch API)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.auth.caller import CallerDep
from api.batch.records import file_object
from api.schemas.ids import ResourceId
from api.services import ServicesDep
from api.serving import files
from api.serving.files import FILES_PATH, MAX_FILES_PAGE

router = APIRouter(tags=["files"])


@router.post(FILES_PATH)
async def create_file(
    file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()], services: ServicesDep, caller: CallerDep
) -> dict:
    """Upload a JSONL batch input (multipart: `file`, `purpose=batch`)."""
    return await files.upload_file(file, purpose, caller, services)


@router.get(FILES_PATH)
async def list_files(
    services: ServicesDep,
    caller: CallerDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_FILES_PAGE)] = MAX_FILES_PAGE,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    return await files.list_files(caller, services, purpose=purpose, after=after, limit=limit, order=order)


@router.get(FILES_PATH + "/{file_id}")
async def get_file(file_id: ResourceId, services: ServicesDep, caller: CallerDep) -> dict:
    return file_object(await files.visible_file(file_id, caller, services))


@router.get(FILES_PATH + "/{file_id}/content")
async def file_content(file_id: ResourceId, services: ServicesDep, caller: CallerDep) -> StreamingResponse:
    return await files.file_content(file_id, caller, services)


@router.delete(FILES_PATH + "/{file_id}")
async def delete_file(file_id: ResourceId, services: ServicesDep, caller: CallerDep) -> dict:
    return await files.delete_file(file_id, caller, services)
