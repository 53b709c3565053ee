"""Streams, consumers and buckets, created idempotently. Workers call `ensure_request_queue` for the model they
serve; the edge only publishes into it."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from broker import subjects

log = structlog.get_logger(__name__)

# Interactive requests are acked when the scheduler admits them, so ack_wait only covers fetch → admit.
_REQUEST_ACK_WAIT_S = 30.0
_REQUEST_MAX_DELIVER = 3


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_requests: int
    max_age_s: float
    duplicate_window_s: float
    max_ack_pending: int = 4096


async def ensure_request_queue(js: JetStreamContext, model_id: str, limits: QueueLimits) -> None:
    """The model's work-queue stream and its one durable pull consumer shared by every worker of the model."""
    stream = StreamConfig(
        name=subjects.request_stream(model_id),
        subjects=[subjects.request_subject(model_id)],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msgs=limits.max_requests,
        discard=DiscardPolicy.NEW,  # a full queue rejects new work (→ 429) instead of dropping queued work
        max_age=limits.max_age_s,
        duplicate_window=limits.duplicate_window_s,
        metadata={"inferq_model": model_id},
    )
    try:
        await js.add_stream(stream)
    except jse.BadRequestError:
        # Exists with another configuration (settings changed): converge on ours.
        await js.update_stream(stream)
    consumer = ConsumerConfig(
        durable_name=subjects.REQUEST_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=_REQUEST_ACK_WAIT_S,
        max_deliver=_REQUEST_MAX_DELIVER,
        max_ack_pending=limits.max_ack_pending,
    )
    # add_consumer is create-or-update for a durable; pull_subscribe(config=) would silently keep an old config.
    await js.add_consumer(stream.name, consumer)
    log.debug("topology.request_queue_ready", model=model_id, stream=stream.name)


async def ensure_registry(js: JetStreamContext, ttl_s: float):
    """KV bucket of live workers: each entry expires `ttl_s` after the worker's last heartbeat."""
    try:
        return await js.key_value(subjects.REGISTRY_BUCKET)
    except jse.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=1, ttl=ttl_s, storage=StorageType.MEMORY)
        )


async def ensure_artifacts(js: JetStreamContext):
    """Object store for files workers publish for the edge (tokenizers)."""
    try:
        return await js.object_store(subjects.ARTIFACT_BUCKET)
    except jse.BucketNotFoundError:
        return await js.create_object_store(
            subjects.ARTIFACT_BUCKET, config=ObjectStoreConfig(storage=StorageType.FILE)
        )
