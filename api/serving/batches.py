"""`/v1/batches`: create (the job record, then its ticket on the job queue), read, list and cancel. Running them
is the batch runner's job (api/batch). A cancel is a compare-and-swap to `cancelling`; the runner holding the
batch notices within a second, stops its lines and finishes it as `cancelled` with the results so far."""

from __future__ import annotations

import time

import structlog

from api.auth.caller import Caller, require_visible, visible_to
from api.batch.lines import ENDPOINTS
from api.batch.records import batch_object, new_object_id, page
from api.errors import ApiError
from api.schemas.batches import BatchCreateRequest
from api.services import Services
from api.serving.files import storage_of, visible_file
from broker.errors import BrokerError
from contracts import BatchJob, BatchStatus, ErrorCode, FilePurpose
from contracts.batch import BatchErrorItem, InvalidTransition

log = structlog.get_logger(__name__)


async def create_batch(body: BatchCreateRequest, caller: Caller, services: Services) -> dict:
    storage = storage_of(services)
    if body.endpoint not in ENDPOINTS:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"endpoint {body.endpoint!r} is not supported; use one of {', '.join(sorted(ENDPOINTS))}",
            param="endpoint",
        )
    record = await visible_file(body.input_file_id, caller, services)
    if record.purpose is not FilePurpose.BATCH:
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"file {record.id} was not uploaded with purpose=batch", param="input_file_id"
        )
    now = int(time.time())
    job = BatchJob(
        id=new_object_id("batch_"),
        owner=caller.owner,
        endpoint=body.endpoint,
        input_file_id=record.id,
        completion_window=body.completion_window,
        metadata=body.metadata,
        created_at=now,
        expires_at=now + body.window_s,
    )
    await storage.jobs.create(job)
    try:
        await storage.queue.publish(job.id)
    except BrokerError as exc:
        # Nothing would ever run it: say so on the record rather than leave it validating forever.
        error = BatchErrorItem(code="unavailable", message="the batch could not be queued")
        await storage.jobs.change(job.id, lambda stored: stored.transition(BatchStatus.FAILED, now, errors=[error]))
        raise ApiError(ErrorCode.UNAVAILABLE, "the batch queue is unavailable; retry later", retry_after=1.0) from exc
    log.info("batch.created", batch_id=job.id, endpoint=job.endpoint, input_file_id=job.input_file_id)
    return batch_object(job)


async def _visible_batch(batch_id: str, caller: Caller, services: Services) -> BatchJob:
    stored = await storage_of(services).jobs.get(batch_id)
    if stored is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"batch {batch_id} does not exist", param="batch_id")
    require_visible(caller, stored.record.owner, f"batch {batch_id}")
    return stored.record


async def get_batch(batch_id: str, caller: Caller, services: Services) -> dict:
    return batch_object(await _visible_batch(batch_id, caller, services))


async def list_batches(caller: Caller, services: Services, *, after: str | None, limit: int) -> dict:
    jobs = visible_to(caller, await storage_of(services).jobs.list(), lambda job: job.owner)
    return page(jobs, lambda job: job.id, batch_object, after=after, limit=limit)


async def cancel_batch(batch_id: str, caller: Caller, services: Services) -> dict:
    await _visible_batch(batch_id, caller, services)

    def cancel(job: BatchJob) -> BatchJob | None:
        if job.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return None  # asking twice is fine
        return job.transition(BatchStatus.CANCELLING, int(time.time()))

    try:
        stored = await storage_of(services).jobs.change(batch_id, cancel)
    except InvalidTransition as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), param="batch_id") from None
    assert stored is not None  # batches are never deleted
    return batch_object(stored.record)
