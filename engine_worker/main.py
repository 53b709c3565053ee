"""`inferq worker`: load the model, join the model's queue, serve until SIGTERM (then drain)."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker.affinity import SubjectTakeover
from broker.artifacts import publish_tokenizer
from broker.connection import NatsAuth, connect
from broker.registry import WorkerRegistry
from broker.topology import QueueLimits, ensure_affine_consumer, ensure_request_queue, ensure_results_stream
from broker.work_queue import RequestIntake
from common.settings import Settings
from common.telemetry import open_tracing
from contracts import DeviceInfo, WorkerInfo
from engine_worker.bridge import BridgeConfig, WorkerBridge
from engine_worker.device import describe_device
from engine_worker.engine_loop import StepEngine
from engine_worker.loader import resolve_model
from engine_worker.loading_thread import run_on_loading_thread

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedEngine:
    engine: StepEngine
    served_name: str
    source: str
    tokenizer_dir: Path
    device: DeviceInfo
    max_model_len: int
    dtype: str
    # Whether the engine's small steps run compiled yet, for the worker's announcements (None: no compiled step).
    compiled_decode_state: Callable[[], str | None] = lambda: None


def load_torch_engine(settings: Settings) -> LoadedEngine:
    from transformers.utils import logging as transformers_logging

    from engine_worker.encoder import EncoderEngine, is_encoder_model
    from engine_worker.engine import Engine

    # Its weight-loading progress bar writes carriage-return frames into the worker's log, which is structured
    # (one JSON object per line with --log-format json); the load is logged by our own lines instead.
    transformers_logging.disable_progress_bar()
    model = resolve_model(settings.model, settings.model_cache_dir, settings.served_model_name)
    log.info("worker.loading_model", model=model.served_name, source=model.source)
    if is_encoder_model(model.local_dir):
        encoder = EncoderEngine(model.local_dir, device=settings.device, torch_threads=settings.torch_threads)
        return LoadedEngine(
            encoder,
            model.served_name,
            model.source,
            model.local_dir,
            describe_device(encoder.device),
            encoder.max_model_len,
            encoder.dtype_name,
        )
    engine = Engine.from_pretrained(model.local_dir, settings.engine_config())
    return LoadedEngine(
        engine,
        model.served_name,
        model.source,
        model.local_dir,
        describe_device(engine.device),
        engine.max_model_len,
        engine.dtype_name,
        engine.compiled_decode_state,
    )


def load_sim_engine(settings: Settings) -> LoadedEngine:
    from engine_worker.sim import SIM_MAX_MODEL_LEN, SimConfig, SimEngine, write_sim_tokenizer

    config = SimConfig(
        max_num_seqs=settings.max_num_seqs,
        tokens_per_s=settings.sim_tokens_per_s,
        max_model_len=settings.max_model_len or SIM_MAX_MODEL_LEN,
    )
    tokenizer_dir = write_sim_tokenizer(settings.data_dir / "sim-tokenizer", config.vocab_size)
    engine = SimEngine(config)
    name = settings.served_model_name or "sim"
    return LoadedEngine(engine, name, "sim", tokenizer_dir, engine.device_info, engine.max_model_len, engine.dtype_name)


ENGINE_LOADERS = {"torch": load_torch_engine, "sim": load_sim_engine}


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.nats_url:
        raise SystemExit("inferq worker needs a NATS server: set INFERQ_NATS_URL or pass --nats")
    if len(settings.models) != 1:
        raise SystemExit("a worker serves one model; `inferq serve --model A --model B` starts one worker each")
    loaded = await run_on_loading_thread(functools.partial(ENGINE_LOADERS[settings.engine], settings))
    # What loading left (transformers' and torch's module state, the tokenizer, the runner) lives as long as the
    # worker: out of the cyclic collector's full scans, whose pauses grow with the objects they walk.
    gc.freeze()
    worker_id = f"w{uuid.uuid4().hex[:12]}"
    structlog.contextvars.bind_contextvars(worker_id=worker_id, model=loaded.served_name)
    nats_auth = NatsAuth.from_settings(settings)
    async with connect(settings.nats_url, name=f"inferq-worker-{worker_id}", auth=nats_auth) as nc:
        js = nc.jetstream()
        limits = QueueLimits(
            max_requests=settings.queue_max_requests,
            max_age_s=settings.queue_max_age_s,
            duplicate_window_s=settings.duplicate_window_s,
            replicas=settings.nats_replicas,
        )
        await ensure_request_queue(js, loaded.served_name, limits)
        # With affinity, a consumer of this worker's own subject exists before the registry lists the worker, so
        # an edge never routes to a subject nobody drains (docs/routing.md).
        own_consumer = (
            await ensure_affine_consumer(js, loaded.served_name, worker_id, limits) if settings.affinity else None
        )
        intake = RequestIntake(js, loaded.served_name, own_consumer)
        await ensure_results_stream(js, settings.results_max_age_s, settings.results_max_bytes, settings.nats_replicas)
        tokenizer_object = await publish_tokenizer(js, loaded.served_name, loaded.tokenizer_dir, settings.nats_replicas)
        registry = await WorkerRegistry.open(js, settings.registry_ttl_s, settings.nats_replicas)
        now = time.time()
        info = WorkerInfo(
            worker_id=worker_id,
            model=loaded.served_name,
            model_source=loaded.source,
            max_model_len=loaded.max_model_len,
            capacity=settings.max_num_seqs,
            device=loaded.device,
            dtype=loaded.dtype,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            updated_at=now,
            tokenizer_object=tokenizer_object,
            compiled_decode=loaded.compiled_decode_state(),
        )
        tracing = open_tracing(settings, "inferq-worker")
        bridge = WorkerBridge(
            nc,
            loaded.engine,
            intake,
            registry,
            info,
            BridgeConfig(
                capacity=settings.max_num_seqs,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                announce_interval_s=max(0.5, settings.registry_ttl_s / 4),
            ),
            validate=loaded.engine.validate,
            tracer=tracing.tracer,
            takeover=SubjectTakeover(js, intake, loaded.served_name, worker_id, limits) if settings.affinity else None,
            compiled_decode_state=loaded.compiled_decode_state,
        )
        try:
            await bridge.run(stop)
        finally:
            tracing.shutdown()  # flush the spans still buffered


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
