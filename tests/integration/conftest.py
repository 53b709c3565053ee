"""One real nats-server, one worker process on the tiny model, and the API, shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess, wait_for_model, wait_healthy
from tests.model_fixtures import TINY_MODEL_NAME

EMBEDDER = "all-MiniLM-L6-v2"  # the packaged embedding model, served by a worker of its own


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("nats-store"), port=-1) as server:
        yield server


@pytest.fixture(scope="session")
def base_settings(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path_factory.mktemp("inferq-data"),
        model=str(tiny_model_dir),
        served_model_name=TINY_MODEL_NAME,
        dtype="float32",
        device="cpu",
        max_num_seqs=8,
        torch_threads=1,
        worker_silence_timeout_s=3.0,
        queue_timeout_s=20.0,
        log_format="json",
    )


@pytest.fixture(scope="session")
def worker(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(base_settings, tmp_path_factory.mktemp("logs") / "worker.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
async def api(base_settings: Settings, worker: WorkerProcess) -> AsyncIterator[ApiServer]:
    server = ApiServer(base_settings).start()
    await wait_healthy(server.base_url, worker)
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def embedder(
    api: ApiServer, base_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WorkerProcess]:
    settings = base_settings.model_copy(update={"model": EMBEDDER, "served_model_name": None})
    process = WorkerProcess(settings, tmp_path_factory.mktemp("embedder") / "worker.log").start()
    await wait_for_model(api.base_url, EMBEDDER, process)
    yield process
    process.stop()
