"""`create_app(settings)`: nothing connects at import time; the lifespan connects to NATS, opens the one
token-event subscription for this edge, starts the batch runner (api/batch), and drains on shutdown."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from api.affinity import AffinityRouter
from api.auth.gate import AuthGate
from api.auth.middleware import AuthMiddleware
from api.batch.runner import BatchRunner
from api.body_limit import BodySizeLimit, LimitFor
from api.catalog import ModelCatalog
from api.crash_metrics import WorkerCrashMeter
from api.errors import install_error_handlers
from api.generation import Timeouts
from api.nats_engine_client import NatsEngineClient
from api.request_context import RequestContextMiddleware
from api.routes import (
    accounts,
    aleph,
    anthropic,
    batches,
    deployments,
    files,
    openai,
    responses,
    system,
    tokenizer,
    websocket,
)
from api.routes.metrics import router as metrics_router
from api.routes.ui import mount_console
from api.services import Services
from api.serving.deployments import Deployments
from api.serving.files import FILES_PATH, MULTIPART_OVERHEAD, size_limit_message
from api.serving.metrics import FleetMetrics
from api.serving.response_runner import ResponseRunner
from api.structured import StructuredValidation
from api.validation_metrics import ValidationMeter
from broker.batch_store import BatchStorage
from broker.connection import NatsAuth, connect
from broker.events import EventRouter
from broker.max_deliveries import MaxDeliveriesWatcher
from broker.registry import WorkerRegistry
from broker.response_store import ResponseStore
from broker.topology import ensure_journal_stream, ensure_max_deliveries_queue
from common.settings import Settings
from common.telemetry import open_tracing

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    if not settings.nats_url:
        raise ValueError("the API needs a NATS server: set INFERQ_NATS_URL or pass --nats")
    edge_id = settings.edge_id or f"e{uuid.uuid4().hex[:12]}"
    auth_gate = AuthGate(settings)
    tracing = open_tracing(settings, "inferq-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nats_auth = NatsAuth.from_settings(settings)
        async with connect(settings.nats_url, name=f"inferq-api-{edge_id}", auth=nats_auth) as nc:
            js = nc.jetstream()
            await auth_gate.open(js)
            # The journal first: from the router's first subscription on, this edge's token events are kept.
            await ensure_journal_stream(
                js, settings.journal_max_age_s, settings.journal_max_bytes, settings.nats_replicas
            )
            router = EventRouter(nc, edge_id)
            await router.start()
            registry = await WorkerRegistry.open(js, settings.registry_ttl_s, settings.nats_replicas)
            app.state.deployments = await Deployments.open(nc, settings)  # records in KV, commands to agents
            catalog = ModelCatalog(js, registry, settings.data_dir / "tokenizers", settings.registry_ttl_s)
            affinity = (
                AffinityRouter(
                    js,
                    catalog,
                    settings.affinity_max_waiting,
                    settings.affinity_prefix_tokens,
                    stale_after_s=settings.registry_ttl_s / 2,
                )
                if settings.affinity
                else None
            )
            validation_meter = ValidationMeter(edge_id)
            app.state.services = services = Services(
                settings=settings,
                catalog=catalog,
                engine=NatsEngineClient(
                    nc,
                    router,
                    Timeouts(queue_s=settings.queue_timeout_s, silence_s=settings.worker_silence_timeout_s),
                    affinity=affinity,
                ),
                batches=await BatchStorage.open(js, settings.batch_job_ack_wait_s, settings.nats_replicas),
                responses=await ResponseStore.open(
                    js, settings.response_job_ack_wait_s, settings.response_ttl_s, settings.nats_replicas
                ),
                structured_validation=StructuredValidation(validation_meter),
            )
            runner = (
                BatchRunner(services, services.batches, nc, meter_for_owner=auth_gate.meter_for_owner)
                if settings.batch_runner
                else None
            )
            if runner is not None:
                await runner.start()
            response_runner = ResponseRunner(services, services.responses, meter_for_owner=auth_gate.meter_for_owner)
            await response_runner.start()
            # Requests whose workers died max_deliver times get their error from here (any replica settles each
            # once): the api's NATS role may read and delete queued requests, a worker's may not (ops/nats/).
            await ensure_max_deliveries_queue(js, settings.nats_replicas)
            crash_watcher = MaxDeliveriesWatcher(nc)
            await crash_watcher.start()
            app.state.fleet_metrics = FleetMetrics(
                nc,
                js,
                services.catalog,
                settings.metrics_scrape_timeout_s,
                settings.supervisor_status_file,
                tuple(
                    c for c in (affinity, validation_meter, WorkerCrashMeter(edge_id, crash_watcher)) if c is not None
                ),
            )
            log.info("api.ready", edge_id=edge_id)
            yield
            await crash_watcher.stop()
            await response_runner.stop()
            if runner is not None:
                await runner.stop()  # before the router: its lines' cancels still go out
            await router.stop()
        tracing.shutdown()  # flush the spans still buffered

    app = FastAPI(title="inferq", version=_package_version(), lifespan=lifespan)
    install_error_handlers(app)

    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(websocket.router)
    app.include_router(tokenizer.router)
    app.include_router(aleph.router)
    app.include_router(system.router)
    app.include_router(accounts.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(deployments.router)
    app.include_router(metrics_router)
    mount_console(app)
    if tracing.tracer is not None:  # a span and a log trace_id per request, inside auth (refusals are not traced)
        app.add_middleware(RequestContextMiddleware, tracer=tracing.tracer)
    # Added last, so outermost: it sees every HTTP request and WebSocket handshake before anything else.
    app.state.auth_gate = auth_gate
    app.add_middleware(AuthMiddleware, gate=auth_gate)
    app.add_middleware(BodySizeLimit, limit_for=_body_limits(settings))  # outermost: before auth reads anything
    return app


def _body_limits(settings: Settings) -> LimitFor:
    def limit_for(path: str) -> tuple[int, str]:
        if path == FILES_PATH:  # file uploads have a limit of their own
            return settings.max_file_bytes + MULTIPART_OVERHEAD, size_limit_message(settings.max_file_bytes)
        return settings.max_request_bytes, f"the request body exceeds {settings.max_request_bytes} bytes"

    return limit_for


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("inferq")
    except PackageNotFoundError:
        return "0.0.0"
