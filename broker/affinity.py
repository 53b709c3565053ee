"""Affinity routing over the work queue (docs/routing.md): which worker a request's key belongs to (rendezvous
hashing), how much already waits on a worker's own subject, and which workers' subjects were left behind by
workers that are gone, for a live worker to take over."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable

from nats.js import JetStreamContext
from nats.js import errors as jse

from broker import subjects
from broker.topology import QueueLimits, ensure_affine_consumer
from broker.work_queue import RequestIntake


def salted_key(owner: str, key: str) -> bytes:
    """The routing key as hashed: salted with the caller's owner, so two tenants sending the same key (or the
    same prompt) land on unrelated workers and cannot learn each other's routing from where theirs goes."""
    return hashlib.sha256(f"{owner}\0{key}".encode()).digest()


def prefix_key(token_ids: Iterable[int]) -> str:
    """A key for a prompt without a better one: its leading tokens (the caller passes how many)."""
    return "tokens:" + hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()


def rendezvous_pick(key: bytes, worker_ids: Iterable[str]) -> str | None:
    """The worker with the highest hash of (key, worker id): every edge picks the same one without talking to the
    others, and when a worker joins or leaves only the keys whose highest score it has or had move (~1/N)."""
    best: tuple[bytes, str] | None = None
    for worker_id in worker_ids:
        score = hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()
        if best is None or (score, worker_id) > best:
            best = (score, worker_id)
    return best[1] if best else None


async def affine_backlog(js: JetStreamContext, model_id: str, worker_id: str) -> int | None:
    """Requests waiting on the worker's own subject (not yet pulled by it); None when it has no consumer (a
    worker that runs without affinity, or one that just went away)."""
    try:
        info = await js.consumer_info(subjects.request_stream(model_id), subjects.affine_consumer(worker_id))
    except jse.NotFoundError:
        return None
    return info.num_pending


async def orphaned_workers(js: JetStreamContext, model_id: str, live_worker_ids: Collection[str]) -> list[str]:
    """Ids of workers that are not live but whose own subject still holds requests (waiting, or pulled and not
    acked): a live worker takes these over. Read from the stream's per-subject counts, so a subject whose
    consumer the server already removed is found too."""
    info = await js.stream_info(subjects.request_stream(model_id), subjects_filter=subjects.affine_wildcard(model_id))
    held = info.state.subjects or {}
    return sorted(
        worker_id
        for worker_id in (subjects.affine_worker(subject) for subject, count in held.items() if count > 0)
        if worker_id not in live_worker_ids
    )


class SubjectTakeover:
    """A live worker's side of "nothing waiting on a dead worker's subject is lost": every `scan`, the own
    subjects of workers missing from the registry that still hold requests are pulled by this worker too (after
    its own, before the shared queue), until they are empty. Every live worker scans, and a consumer pulled by
    several hands each request to exactly one of them."""

    def __init__(self, js: JetStreamContext, intake: RequestIntake, model_id: str, worker_id: str, limits: QueueLimits):
        self._js = js
        self._intake = intake
        self._model_id = model_id
        self._worker_id = worker_id
        self._limits = limits

    async def scan(self, live_worker_ids: Collection[str]) -> None:
        orphans = await orphaned_workers(self._js, self._model_id, {*live_worker_ids, self._worker_id})
        consumers = set()
        for worker_id in orphans:
            consumer = subjects.affine_consumer(worker_id)
            if consumer not in self._intake.adopted:  # the server may have removed an idle one: make it again
                await ensure_affine_consumer(self._js, self._model_id, worker_id, self._limits)
            consumers.add(consumer)
        await self._intake.adopt(consumers)
