"""Which models are served, by which live workers, and their tokenizers (downloaded from the object store the
workers publish to, so this edge needs no model files)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js import errors as jse

from api.errors import ApiError
from api.tokenizer_loading import load_tokenizer
from broker import subjects
from broker.artifacts import fetch_tokenizer
from broker.errors import BrokerUnavailable
from broker.registry import WorkerRegistry
from contracts import ErrorCode, WorkerInfo

log = structlog.get_logger(__name__)

_CACHE_S = 0.5


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str
    max_model_len: int
    workers: tuple[WorkerInfo, ...]

    @property
    def created(self) -> int:
        return int(min(worker.started_at for worker in self.workers))

    @property
    def root(self) -> str:
        return self.workers[0].model_source


class ModelCatalog:
    def __init__(
        self, js: JetStreamContext, registry: WorkerRegistry, tokenizer_cache: Path, registry_ttl_s: float = 10.0
    ):
        self._js = js
        self._registry = registry
        self._registry_ttl_s = registry_ttl_s  # a worker's entry outlives its death by this much anyway
        self._tokenizer_cache = tokenizer_cache
        self._workers: list[WorkerInfo] = []
        self._fetched_at = 0.0
        self._seen_at = float("-inf")  # when the registry last listed any worker
        self._lock = asyncio.Lock()
        self._tokenizers: dict[str, Any] = {}
        self._tokenizer_lock = asyncio.Lock()

    async def workers(self) -> list[WorkerInfo]:
        async with self._lock:
            if time.monotonic() - self._fetched_at > _CACHE_S:
                try:
                    workers = await self._registry.live_workers()
                    if workers:
                        self._seen_at = time.monotonic()
                    if workers or time.monotonic() - self._seen_at > self._registry_ttl_s:
                        self._workers = workers
                    else:  # every worker gone at once, within one registry TTL: far likelier a KV failover
                        log.warning("catalog.registry_empty_kept_last", workers=len(self._workers))
                except BrokerUnavailable as exc:
                    if not self._fetched_at:
                        raise
                    # A NATS node failing over: the fleet seen a moment ago beats failing every request; the
                    # next refresh tries again (and requests to a worker that died meanwhile are resumed).
                    log.warning("catalog.registry_unavailable", error=str(exc), stale_workers=len(self._workers))
                self._fetched_at = time.monotonic()
            return self._workers

    async def models(self) -> list[ServedModel]:
        by_model: dict[str, list[WorkerInfo]] = {}
        for worker in await self.workers():
            by_model.setdefault(worker.model, []).append(worker)
        return [
            ServedModel(model_id, min(w.max_model_len for w in workers), tuple(workers))
            for model_id, workers in sorted(by_model.items())
        ]

    async def get(self, model_id: str) -> ServedModel:
        """The live model, or 503 when it is known (its queue exists) but no worker is up, else 404."""
        for model in await self.models():
            if model.id == model_id:
                return model
        try:
            await self._js.stream_info(subjects.request_stream(model_id))
        except jse.NotFoundError:
            raise ApiError(ErrorCode.MODEL_NOT_FOUND, f"the model {model_id!r} does not exist", param="model") from None
        raise ApiError(ErrorCode.NO_WORKER, f"no worker for model {model_id!r} is running", retry_after=5.0)

    async def tokenizer(self, model: ServedModel):
        """The tokenizer the model's worker published (api/tokenizer_loading.py; cached per content digest)."""
        name = model.workers[0].tokenizer_object
        if name not in self._tokenizers:
            async with self._tokenizer_lock:  # one load at a time (concurrent first loads race)
                if name not in self._tokenizers:
                    self._tokenizers[name] = await self._load(model, name)
        return self._tokenizers[name]

    async def _load(self, model: ServedModel, name: str):
        try:
            directory = await fetch_tokenizer(self._js, name, self._tokenizer_cache)
            return await asyncio.to_thread(load_tokenizer, directory)
        except Exception as exc:  # a missing or unreadable object is our side's failure, never the client's input
            log.warning("catalog.tokenizer_failed", model=model.id, tokenizer=name, error=repr(exc))
            raise ApiError(
                ErrorCode.UNAVAILABLE,
                f"the tokenizer of {model.id!r} could not be loaded; retry shortly",
                retry_after=1.0,
            ) from exc
