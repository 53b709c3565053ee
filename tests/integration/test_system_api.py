"""System endpoints that report the live workers' hardware, and the route list clients and fuzzers read."""

from __future__ import annotations

import httpx
import pytest

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


async def test_gpu_info_on_a_cpu_worker(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        info = (await http.get("/v1/gpu/info")).json()
        health = (await http.get("/health")).json()
    assert info["gpus"] == [] and health["gpus"] == 0  # the test worker runs on the CPU
    # Other tests' workers (sim engines) may be live on the shared server too: find the tiny model's CPU.
    [cpu] = [cpu for cpu in info["cpu"] if TINY_MODEL_NAME in cpu["models"]]
    assert cpu["name"] and cpu["workers"]


async def test_openapi_lists_every_surface(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    for path in (
        "/tokenize",
        "/detokenize",
        "/v1/tokenize",
        "/v1/detokenize",
        "/complete",
        "/models_available",
        "/v1/gpu/info",
        "/version",
        "/health",
    ):
        assert path in paths, path
    schema = paths["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(schema["oneOf"]) == 2  # Aleph Alpha's body or vLLM's
