"""Streams, consumers and buckets, created idempotently. Workers call `ensure_request_queue` for the model they
serve; the edge only publishes into it. Each is created with `replicas` copies (Settings.nats_replicas: 3 on a
3-node cluster); an existing one is used as it is."""

from __future__ import annotations

import asyncio
import functools
import time
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
from broker.errors import BrokerUnavailable

log = structlog.get_logger(__name__)

# Interactive requests are acked when the scheduler admits them, so ack_wait only covers fetch → admit.
REQUEST_ACK_WAIT_S = 30.0
# A request is handed to workers at most this often (a request that kills every worker it reaches is not retried
# forever); a worker that gives a held fire-and-forget request back queues it anew (engine_worker/bridge.py).
REQUEST_MAX_DELIVER = 3
_AFFINE_INACTIVE_S = 600.0  # a dead worker's consumer outlives it this long (its subject is re-adopted anyway)
_TWO_DAYS_S = 2 * 86_400.0
_DEFAULT_DUPLICATE_WINDOW_S = 120.0  # the server's default
_ENSURE_RETRY_S = 30.0
_LEADER_WAIT_S = 10.0
_MAX_DELIVERIES_KEPT_S = 86_400.0
_MAX_DELIVERIES_KEPT = 100_000


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_requests: int
    max_age_s: float
    duplicate_window_s: float
    max_ack_pending: int = 4096
    replicas: int = 1  # JetStream copies of each stream: 3 on a 3-node cluster, 1 on a single server


async def ensure_request_queue(js: JetStreamContext, model_id: str, limits: QueueLimits) -> None:
    """The model's work queues, each with one durable pull consumer shared by every worker of the model: the
    interactive queue and the batch lane (pulled only when the interactive queue is empty). The lane has its own
    cap, so a large batch never makes interactive requests see a full queue. The interactive stream also captures
    the workers' own subjects (subjects.affine_wildcard), so the shared consumer is filtered to the shared subject:
    on a work queue, consumers' filters must not overlap."""
    await _ensure_work_queue(
        js,
        subjects.request_stream(model_id),
        subjects.request_subject(model_id),
        model_id,
        limits,
        extra_subjects=[subjects.affine_wildcard(model_id)],
    )
    await _ensure_work_queue(js, subjects.batch_stream(model_id), subjects.batch_subject(model_id), model_id, limits)
    # Whoever creates work queues keeps their max-deliveries advisories from then on, api up or not.
    await ensure_max_deliveries_stream(js, limits.replicas)
    log.debug("topology.request_queue_ready", model=model_id)


async def ensure_affine_consumer(js: JetStreamContext, model_id: str, worker_id: str, limits: QueueLimits) -> str:
    """The durable consumer of one worker's own subject (created or updated; any worker may call it for any
    worker id, which is how a dead worker's subject is taken over). Returns its name. A consumer nobody pulls for
    `_AFFINE_INACTIVE_S` is removed by the server; what it left in the stream is found again by its subject
    (broker/affinity.py)."""
    name = subjects.affine_consumer(worker_id)
    # `name` as well as `durable_name`: nats-py then puts the filter into the API subject, which lets the worker
    # role's permissions allow creating consumers of affine subjects only (ops/nats/auth.conf).
    await js.add_consumer(
        subjects.request_stream(model_id),
        _request_consumer(
            name, limits, subjects.affine_subject(model_id, worker_id), name=name, inactive_threshold=_AFFINE_INACTIVE_S
        ),
    )
    return name


def _request_consumer(durable: str, limits: QueueLimits, filter_subject: str, **extra) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=REQUEST_ACK_WAIT_S,
        max_deliver=REQUEST_MAX_DELIVER,
        max_ack_pending=limits.max_ack_pending,
        filter_subject=filter_subject,
        **extra,
    )


async def _ensure_work_queue(
    js: JetStreamContext,
    name: str,
    subject: str,
    model_id: str,
    limits: QueueLimits,
    extra_subjects: list[str] | None = None,
) -> None:
    stream = StreamConfig(
        name=name,
        subjects=[subject, *(extra_subjects or [])],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msgs=limits.max_requests,
        discard=DiscardPolicy.NEW,  # a full queue rejects new work (→ 429) instead of dropping queued work
        max_age=limits.max_age_s,
        duplicate_window=limits.duplicate_window_s,
        num_replicas=limits.replicas,
        metadata={"inferq_model": model_id},
    )
    await _stream(js, stream)
    # add_consumer is create-or-update for a durable; pull_subscribe(config=) would silently keep an old config.
    # The filter is the shared subject only (a consumer made before affinity existed had none: this updates it).
    await js.add_consumer(stream.name, _request_consumer(subjects.REQUEST_CONSUMER, limits, subject))


async def ensure_max_deliveries_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """The stream that keeps JetStream's max-deliveries advisories (subjects.MAX_DELIVERIES_WILDCARD): they are core
    NATS messages, which a watcher that is down when one is published would miss. Kept a day: longer than a
    request stays in its queue (Settings.queue_max_age_s), after which there is nothing left to answer."""
    await _kept_stream(
        js,
        subjects.MAX_DELIVERIES_STREAM,
        subjects.MAX_DELIVERIES_WILDCARD,
        _MAX_DELIVERIES_KEPT_S,
        replicas,
        max_msgs=_MAX_DELIVERIES_KEPT,
    )


async def ensure_max_deliveries_queue(js: JetStreamContext, replicas: int = 1) -> None:
    """The advisory stream and the one durable consumer every watcher shares (broker/max_deliveries.py): each
    advisory goes to one watcher at a time, and to another after the ack wait if that one died meanwhile."""
    await ensure_max_deliveries_stream(js, replicas)
    await js.add_consumer(
        subjects.MAX_DELIVERIES_STREAM,
        ConsumerConfig(
            durable_name=subjects.MAX_DELIVERIES_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=REQUEST_ACK_WAIT_S,
            max_deliver=-1,  # settling fails only while NATS does: try again until it works
            max_ack_pending=1000,
        ),
    )


def retrying_while_electing(ensure):
    """Streams and buckets are ensured by every process at startup. On a fresh cluster several processes create
    replicated ones at once, and the JetStream API may time out or answer 503 while their groups elect leaders:
    that passes within seconds, so try again rather than fail the process's startup."""

    @functools.wraps(ensure)
    async def ensured(*args, **kwargs):
        deadline = time.monotonic() + _ENSURE_RETRY_S
        while True:
            try:
                return await ensure(*args, **kwargs)
            except (TimeoutError, jse.ServiceUnavailableError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("topology.ensure_retrying", what=ensure.__name__, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)

    return ensured


@retrying_while_electing
async def _stream(js: JetStreamContext, stream: StreamConfig) -> None:
    try:
        await js.add_stream(stream)
    except jse.BadRequestError:
        # Exists with another configuration (settings changed): converge on ours.
        await js.update_stream(stream)
    await _await_leader(js, stream.name)


@retrying_while_electing
async def _key_value(js: JetStreamContext, config: KeyValueConfig):
    """The bucket if it exists (whatever its config), else created with `config`."""
    try:
        bucket = await js.key_value(config.bucket)
    except jse.BucketNotFoundError:
        bucket = await js.create_key_value(config)
    await _await_leader(js, f"KV_{config.bucket}")
    return bucket


@retrying_while_electing
async def _object_store(js: JetStreamContext, name: str, replicas: int):
    """The object store if it exists (whatever its config), else created file-backed with `replicas`."""
    try:
        store = await js.object_store(name)
    except jse.BucketNotFoundError:
        store = await js.create_object_store(
            name, config=ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas)
        )
    await _await_leader(js, f"OBJ_{name}")
    return store


async def _await_leader(js: JetStreamContext, stream_name: str) -> None:
    """A replicated stream that was just created, here or by a process on another node, answers reads only once
    its group has a leader: until then a direct get (KV get, object info) times out instead of failing fast."""
    deadline = time.monotonic() + _LEADER_WAIT_S
    while True:
        try:
            info = await js.stream_info(stream_name)
        except jse.NotFoundError:
            # Created an instant ago by another process: the node answering may not have applied it yet (seen
            # by the chaos run when two api replicas start at once on a 3-node cluster).
            info = None
        if info is not None and (
            (info.config.num_replicas or 1) <= 1 or (info.cluster is not None and info.cluster.leader)
        ):
            return
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"stream {stream_name} has no leader after {_LEADER_WAIT_S:g} s")
        await asyncio.sleep(0.05)


async def ensure_registry(js: JetStreamContext, ttl_s: float, replicas: int = 1):
    """KV bucket of live workers: each entry expires `ttl_s` after the worker's last heartbeat."""
    return await _key_value(
        js,
        KeyValueConfig(
            bucket=subjects.REGISTRY_BUCKET, history=1, ttl=ttl_s, storage=StorageType.MEMORY, replicas=replicas
        ),
    )


async def ensure_accounts(js: JetStreamContext, replicas: int = 1):
    """KV bucket of users, API keys and login tokens (hashes only). File storage: accounts survive restarts."""
    return await _key_value(
        js, KeyValueConfig(bucket=subjects.ACCOUNTS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas)
    )


async def ensure_rate_limits(js: JetStreamContext, replicas: int = 1):
    """KV bucket of per-owner usage windows, updated by compare-and-swap from every API replica. An entry nobody
    touched for two days only holds finished windows, so the bucket TTL collects it."""
    return await _key_value(
        js,
        KeyValueConfig(
            bucket=subjects.RATE_LIMIT_BUCKET, history=1, ttl=_TWO_DAYS_S, storage=StorageType.FILE, replicas=replicas
        ),
    )


async def ensure_artifacts(js: JetStreamContext, replicas: int = 1):
    """Object store for files workers publish for the edge (tokenizers)."""
    return await _object_store(js, subjects.ARTIFACT_BUCKET, replicas)


async def ensure_batch_storage(js: JetStreamContext, replicas: int = 1):
    """KV buckets for file records, batch jobs and line results, and the object store for file contents; all
    file-backed (a batch survives any restart). Returns (files, file_data, batches, results)."""

    def bucket(name: str, history: int = 1) -> KeyValueConfig:
        return KeyValueConfig(bucket=name, history=history, storage=StorageType.FILE, replicas=replicas)

    files = await _key_value(js, bucket(subjects.FILES_BUCKET))
    batches = await _key_value(js, bucket(subjects.BATCHES_BUCKET, history=5))
    results = await _key_value(js, bucket(subjects.BATCH_RESULTS_BUCKET))
    file_data = await _object_store(js, subjects.FILE_DATA_BUCKET, replicas)
    return files, file_data, batches, results


async def ensure_response_storage(js: JetStreamContext, ttl_s: float, replicas: int = 1):
    """The KV bucket of stored responses (file-backed, compare-and-swap updates) and the stream of background
    responses' events, both expiring `ttl_s` after each write (the server deletes them; an existing bucket is
    moved to this TTL, so a changed setting applies to what is stored already). Returns the bucket."""
    duplicate_window = min(_DEFAULT_DUPLICATE_WINDOW_S, ttl_s)  # the server refuses a window longer than max_age
    responses = await _key_value(
        js,
        KeyValueConfig(
            bucket=subjects.RESPONSES_BUCKET, history=1, ttl=ttl_s, storage=StorageType.FILE, replicas=replicas
        ),
    )
    await _converge_max_age(js, f"KV_{subjects.RESPONSES_BUCKET}", ttl_s, duplicate_window)
    await _stream(
        js,
        StreamConfig(
            name=subjects.RESPONSE_EVENTS_STREAM,
            subjects=[subjects.RESPONSE_EVENTS_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=ttl_s,
            duplicate_window=duplicate_window,
            num_replicas=replicas,
        ),
    )
    return responses


@retrying_while_electing
async def _converge_max_age(js: JetStreamContext, stream_name: str, max_age_s: float, duplicate_window_s: float):
    """Give an existing stream (a KV bucket's) this max_age, keeping the rest of its configuration."""
    config = (await js.stream_info(stream_name)).config
    if config.max_age == max_age_s and config.duplicate_window == duplicate_window_s:
        return
    config.max_age, config.duplicate_window = max_age_s, duplicate_window_s
    await js.update_stream(config)
    log.info("topology.max_age_changed", stream=stream_name, max_age_s=max_age_s)


async def ensure_batch_jobs(js: JetStreamContext, ack_wait_s: float, replicas: int = 1) -> None:
    """The job queue: one ticket per batch (deduplicated by batch id), one durable consumer shared by every
    runner. A runner heartbeats its ticket (in_progress) and acks only once the batch is in a final state, so
    a dead runner's batch goes to another after `ack_wait_s`; tickets are never dropped (no max_deliver). The
    duplicate window is long so that the orphan sweep can re-queue any batch's ticket without doubling it."""
    await _job_queue(
        js, subjects.BATCH_JOB_STREAM, subjects.BATCH_JOB_SUBJECT, subjects.BATCH_JOB_CONSUMER, ack_wait_s, replicas
    )


async def ensure_response_jobs(js: JetStreamContext, ack_wait_s: float, replicas: int = 1) -> None:
    """The queue of background responses to run: as the batch job queue (a dead runner's response goes to
    another after `ack_wait_s`)."""
    await _job_queue(
        js,
        subjects.RESPONSE_JOB_STREAM,
        subjects.RESPONSE_JOB_SUBJECT,
        subjects.RESPONSE_JOB_CONSUMER,
        ack_wait_s,
        replicas,
    )


async def _job_queue(
    js: JetStreamContext, name: str, subject: str, consumer: str, ack_wait_s: float, replicas: int
) -> None:
    stream = StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=_TWO_DAYS_S,
        num_replicas=replicas,
    )
    await _stream(js, stream)
    await js.add_consumer(
        stream.name,
        ConsumerConfig(
            durable_name=consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=-1,
            max_ack_pending=10_000,
        ),
    )


async def ensure_results_stream(js: JetStreamContext, max_age_s: float, max_bytes: int, replicas: int = 1) -> None:
    """Durable replies of fire-and-forget publishers (subjects.RESULTS_WILDCARD), kept `max_age_s`; when full
    the oldest results go first, so a publisher that never reads cannot block anyone else's."""
    await _kept_stream(js, subjects.RESULTS_STREAM, subjects.RESULTS_WILDCARD, max_age_s, replicas, max_bytes=max_bytes)


async def _kept_stream(
    js: JetStreamContext, name: str, wildcard: str, max_age_s: float, replicas: int, **caps: int
) -> None:
    """A file-backed stream that keeps what is published on `wildcard` for `max_age_s`; past its `caps`
    (max_bytes, max_msgs) the oldest messages go first."""
    await _stream(
        js,
        StreamConfig(
            name=name,
            subjects=[wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=max_age_s,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
            **caps,
        ),
    )


_INSUFFICIENT_RESOURCES = 10028


async def ensure_journal_stream(js: JetStreamContext, max_age_s: float, max_bytes: int, replicas: int = 1) -> bool:
    """The interactive token events (subjects.JOURNAL_WILDCARD), kept `max_age_s` in memory for replays by
    another edge. Workers publish them on core NATS (no per-token ack); when full the oldest go first.

    Returns False when the server has no memory to reserve for it: the edge serves on without replays (a
    resume is then a 404, a repeated Idempotency-Key a new request) rather than not at all."""
    try:
        await _stream(
            js,
            StreamConfig(
                name=subjects.JOURNAL_STREAM,
                subjects=[subjects.JOURNAL_WILDCARD],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.MEMORY,
                max_age=max_age_s,
                max_bytes=max_bytes,
                discard=DiscardPolicy.OLD,
                num_replicas=replicas,
            ),
        )
    except jse.APIError as exc:
        if exc.err_code != _INSUFFICIENT_RESOURCES:
            raise
        log.warning(
            "topology.journal_unavailable",
            max_bytes=max_bytes,
            error=exc.description,
            fix="raise the server's jetstream max_memory_store or lower INFERQ_JOURNAL_MAX_BYTES",
        )
        return False
    return True
