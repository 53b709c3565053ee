"""Liveness, version and the workers' hardware."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from api.services import ServicesDep
from api.serving.devices import gpu_count, gpu_info

router = APIRouter(tags=["system"])

# The Aleph Alpha API version whose surface we serve; its client's validate_version() needs 1.x >= 1.19.
ALEPH_API_VERSION = "1.19.0"


@router.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    """200 only while at least one worker is live. `compiling`: workers still compiling their small decode step
    (they serve meanwhile, eager; docs/compiled-decode.md)."""
    workers = await services.catalog.workers()
    models = sorted({worker.model for worker in workers})
    body = {
        "status": "healthy" if workers else "unhealthy",
        "model": models[0] if models else None,
        "models": models,
        "workers": len(workers),
        "compiling": sum(1 for worker in workers if worker.compiled_decode == "compiling"),
        "gpus": gpu_count(workers),
    }
    return JSONResponse(body, status_code=200 if workers else 503)


@router.get("/version", response_class=PlainTextResponse)
async def version() -> str:
    """Plain-text semver, as the Aleph Alpha API and its client expect (see docs/api.md)."""
    return ALEPH_API_VERSION


@router.get("/v1/gpu/info")
async def gpu_information(services: ServicesDep) -> dict:
    """The GPUs live workers run on (an empty list when none has one) and, for CPU workers, their processors."""
    return gpu_info(await services.catalog.workers())
