"""`/health`: healthy while a worker is live, and how many live workers still compile their decode step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from api.routes.system import health
from contracts import DeviceInfo
from tests.api.serving.test_devices import worker

pytestmark = pytest.mark.asyncio

CPU = DeviceInfo(kind="cpu", name="AMD EPYC")


def _services(*workers) -> SimpleNamespace:
    async def live_workers():
        return list(workers)

    return SimpleNamespace(catalog=SimpleNamespace(workers=live_workers))


async def test_health_counts_the_workers_still_compiling_their_decode_step() -> None:
    compiling = worker("w1", CPU).model_copy(update={"compiled_decode": "compiling"})
    ready = worker("w2", CPU).model_copy(update={"compiled_decode": "ready"})
    eager = worker("w3", CPU)  # no compiled step (a GPU worker, the sim, compile_decode off)
    response = await health(_services(compiling, ready, eager))
    body = json.loads(response.body)
    assert response.status_code == 200
    assert (body["status"], body["workers"], body["compiling"]) == ("healthy", 3, 1)
    body = json.loads((await health(_services(ready, eager))).body)
    assert body["compiling"] == 0


async def test_health_is_503_without_a_live_worker() -> None:
    response = await health(_services())
    assert response.status_code == 503
    assert json.loads(response.body) == {
        "status": "unhealthy",
        "model": None,
        "models": [],
        "workers": 0,
        "compiling": 0,
        "gpus": 0,
    }
