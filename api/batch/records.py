"""Ids and the OpenAI wire shapes of file and batch records, and cursor pagination for their listings."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from api.errors import ApiError
from contracts import BatchJob, ErrorCode, FileRecord

T = TypeVar("T")
MAX_PAGE = 100


def new_object_id(prefix: str) -> str:
    """`<prefix><ms clock><random>`: ids sort by creation time, so listings page by id."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def file_object(record: FileRecord) -> dict:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose.value,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def batch_object(job: BatchJob) -> dict:
    fields = job.model_dump(exclude={"v", "owner", "runner_id", "epoch", "usage", "errors"})
    usage = None
    if job.usage is not None:
        usage = {
            "input_tokens": job.usage.input_tokens,
            "output_tokens": job.usage.output_tokens,
            "total_tokens": job.usage.input_tokens + job.usage.output_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    errors = {"object": "list", "data": [error.model_dump() for error in job.errors]} if job.errors else None
    return {**fields, "object": "batch", "status": job.status.value, "errors": errors, "usage": usage, "model": None}


def page(
    items: Sequence[T],
    id_of: Callable[[T], str],
    render: Callable[[T], dict],
    *,
    after: str | None,
    limit: int,
    max_limit: int = MAX_PAGE,
    newest_first: bool = True,
) -> dict:
    """OpenAI's list shape: `{object: "list", data, first_id, last_id, has_more}`; `after` is the last id of the
    previous page."""
    if not 1 <= limit <= max_limit:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"limit must be between 1 and {max_limit}", param="limit")
    ordered = sorted(items, key=id_of, reverse=newest_first)
    if after is not None:
        ids = [id_of(item) for item in ordered]
        if after not in ids:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"after: {after!r} is not in this list", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": [render(item) for item in data],
        "first_id": id_of(data[0]) if data else None,
        "last_id": id_of(data[-1]) if data else None,
        "has_more": len(ordered) > limit,
    }
