"""`/v1/files`: uploads (multipart, purpose `batch`) into the object store, their records, their contents
(streamed from a spool file, never held in memory) and deletion. Only the owner (or an admin) sees a file."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import BinaryIO

from fastapi import UploadFile
from fastapi.responses import StreamingResponse

from api.auth.caller import Caller, require_visible, visible_to
from api.batch.records import file_object, new_object_id, page
from api.errors import ApiError
from api.services import Services
from broker.batch_store import BatchStorage, FileMissing
from contracts import ErrorCode, FilePurpose, FileRecord

FILES_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024  # form framing around the file, allowed on top of the size limit
MAX_FILES_PAGE = 10_000  # OpenAI's limit for this listing
_CHUNK = 256 * 1024
_SPOOL_IN_MEMORY = 1024 * 1024


def storage_of(services: Services) -> BatchStorage:
    if services.batches is None:
        raise ApiError(ErrorCode.UNAVAILABLE, "files and batches are not available on this server")
    return services.batches


def size_limit_message(limit: int) -> str:
    return f"files are limited to {limit} bytes (INFERQ_MAX_FILE_BYTES)"


async def upload_file(upload: UploadFile, purpose: str, caller: Caller, services: Services) -> dict:
    if purpose != FilePurpose.BATCH.value:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"purpose {purpose!r} is not supported; files here are for batches (purpose=batch)",
            param="purpose",
        )
    limit = services.settings.max_file_bytes
    size = _size(upload.file)
    if size > limit:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, size_limit_message(limit), param="file")
    record = FileRecord(
        id=new_object_id("file-"),
        filename=upload.filename or "upload.jsonl",
        purpose=FilePurpose.BATCH,
        bytes=size,
        created_at=int(time.time()),
        owner=caller.owner,
    )
    return file_object(await storage_of(services).files.put(record, upload.file))


def _size(source: BinaryIO) -> int:
    """Bytes in the spooled upload (a chunked request has no Content-Length to check up front)."""
    source.seek(0, 2)
    size = source.tell()
    source.seek(0)
    return size


async def visible_file(file_id: str, caller: Caller, services: Services) -> FileRecord:
    record = await storage_of(services).files.get(file_id)
    if record is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"file {file_id} does not exist", param="file_id")
    require_visible(caller, record.owner, f"file {file_id}")
    return record


async def list_files(
    caller: Caller, services: Services, *, purpose: str | None, after: str | None, limit: int, order: str
) -> dict:
    records = visible_to(caller, await storage_of(services).files.list(), lambda record: record.owner)
    if purpose is not None:
        records = [record for record in records if record.purpose.value == purpose]
    return page(
        records,
        lambda record: record.id,
        file_object,
        after=after,
        limit=limit,
        max_limit=MAX_FILES_PAGE,
        newest_first=order != "asc",
    )


async def file_content(file_id: str, caller: Caller, services: Services) -> StreamingResponse:
    record = await visible_file(file_id, caller, services)
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    try:
        await storage_of(services).files.read_into(file_id, spool)
    except FileMissing:
        spool.close()
        raise ApiError(ErrorCode.NOT_FOUND, f"file {file_id} has no contents", param="file_id") from None
    spool.seek(0)
    return StreamingResponse(
        _chunks(spool),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(record.bytes),
            "Content-Disposition": f'attachment; filename="{record.filename}"',
        },
    )


def _chunks(spool: BinaryIO) -> Iterator[bytes]:
    with spool:
        while chunk := spool.read(_CHUNK):
            yield chunk


async def delete_file(file_id: str, caller: Caller, services: Services) -> dict:
    await visible_file(file_id, caller, services)
    deleted = await storage_of(services).files.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": deleted}
