"""`inferq worker`: load the model, join the model's queue, serve until SIGTERM (then drain)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid

import structlog

from broker.artifacts import publish_tokenizer
from broker.connection import connect
from broker.registry import WorkerRegistry
from broker.topology import QueueLimits, ensure_request_queue
from broker.work_queue import RequestIntake
from contracts import WorkerInfo
from engine_worker.bridge import BridgeConfig, WorkerBridge
from engine_worker.device import describe_device
from engine_worker.loader import resolve_model
from ops.settings import Settings

log = structlog.get_logger(__name__)


def engine_config_from(settings: Settings):
    from engine_worker.engine import EngineConfig

    return EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,
        kv_cache_tokens=settings.kv_cache_tokens,
        dtype=settings.dtype,
        device=settings.device,
        torch_threads=settings.torch_threads,
    )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.nats_url:
        raise SystemExit("inferq worker needs a NATS server: set INFERQ_NATS_URL or pass --nats")
    from engine_worker.engine import Engine

    model = await asyncio.to_thread(resolve_model, settings.model, settings.model_cache_dir,
                                    settings.served_model_name)
    log.info("worker.loading_model", model=model.served_name, source=model.source)
    engine = await asyncio.to_thread(Engine.from_pretrained, model.local_dir, engine_config_from(settings))
    worker_id = f"w{uuid.uuid4().hex[:12]}"
    structlog.contextvars.bind_contextvars(worker_id=worker_id, model=model.served_name)
    async with connect(settings.nats_url, name=f"inferq-worker-{worker_id}") as nc:
        js = nc.jetstream()
        await ensure_request_queue(js, model.served_name, QueueLimits(
            max_requests=settings.queue_max_requests,
            max_age_s=settings.queue_max_age_s,
            duplicate_window_s=settings.duplicate_window_s,
        ))
        tokenizer_object = await publish_tokenizer(js, model.served_name, model.local_dir)
        registry = await WorkerRegistry.open(js, settings.registry_ttl_s)
        now = time.time()
        info = WorkerInfo(
            worker_id=worker_id,
            model=model.served_name,
            model_source=model.source,
            max_model_len=engine.max_model_len,
            capacity=settings.max_num_seqs,
            device=describe_device(engine.device),
            dtype=engine.dtype_name,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            updated_at=now,
            tokenizer_object=tokenizer_object,
        )
        bridge = WorkerBridge(
            nc,
            engine,
            RequestIntake(js, model.served_name),
            registry,
            info,
            BridgeConfig(
                capacity=settings.max_num_seqs,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                announce_interval_s=max(0.5, settings.registry_ttl_s / 4),
            ),
            validate=engine.validate,
        )
        await bridge.run(stop)


def run_worker(settings: Settings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(main())
    except RuntimeError as exc:
        log.error("worker.failed", error=str(exc))
        sys.exit(1)
