"""`create_app(settings)`: nothing connects at import time; the lifespan connects to NATS, opens the one
token-event subscription for this edge, and drains on shutdown."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.catalog import ModelCatalog
from api.engine_client import EngineClient, Timeouts
from api.errors import error_body, install_error_handlers
from api.routes import openai, system
from api.services import Services
from broker.connection import connect
from broker.events import EventRouter
from broker.registry import WorkerRegistry
from contracts import ErrorCode
from ops.settings import Settings

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> FastAPI:
    if not settings.nats_url:
        raise ValueError("the API needs a NATS server: set INFERQ_NATS_URL or pass --nats")
    edge_id = settings.edge_id or f"e{uuid.uuid4().hex[:12]}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with connect(settings.nats_url, name=f"inferq-api-{edge_id}") as nc:
            js = nc.jetstream()
            router = EventRouter(nc, edge_id)
            await router.start()
            registry = await WorkerRegistry.open(js, settings.registry_ttl_s)
            app.state.services = Services(
                settings=settings,
                catalog=ModelCatalog(js, registry, settings.data_dir / "tokenizers"),
                engine=EngineClient(nc, router, Timeouts(queue_s=settings.queue_timeout_s,
                                                          silence_s=settings.worker_silence_timeout_s)),
            )
            log.info("api.ready", edge_id=edge_id)
            yield
            await router.stop()

    app = FastAPI(title="inferq", version=_package_version(), lifespan=lifespan)
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            return JSONResponse(error_body(413, f"the request body exceeds {settings.max_request_bytes} bytes",
                                           code=ErrorCode.PAYLOAD_TOO_LARGE.value), status_code=413)
        return await call_next(request)

    app.include_router(openai.router)
    app.include_router(system.router)
    return app


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("inferq")
    except PackageNotFoundError:
        return "0.0.0"
