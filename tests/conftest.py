"""Session-wide fixtures: models the tests build, and (in tests/integration) real NATS servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.model_fixtures import build_tiny_llama, convert_packaged_smollm2, save_smollm2_tokenizer


def pytest_configure(config: pytest.Config) -> None:
    # inferq serve compiles its small decode step by default on a CPU (`compile_decode=auto`): minutes of both
    # cores beside every worker a test starts. Workers and settings in tests run eager; the compiled step has its
    # own tests (tests/engine_worker/test_compiled_decode.py), which ask for it.
    os.environ["INFERQ_COMPILE_DECODE"] = "false"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2 (the default model) dequantized once for the whole session: every test that runs it
    loads this copy (tests/model_fixtures.seed_model_cache puts it into a data dir's model cache)."""
    return convert_packaged_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def batch_nats(tmp_path_factory: pytest.TempPathFactory):
    """A real server for the batch storage and batch run tests (tests/broker, tests/api)."""
    from broker.embedded import EmbeddedNatsServer

    with EmbeddedNatsServer(tmp_path_factory.mktemp("batch-store")) as server:
        yield server


@pytest.fixture
async def batch_storage(batch_nats):
    from broker.batch_store import BatchStorage
    from broker.connection import connect

    async with connect(batch_nats.url, "test") as nc:
        yield await BatchStorage.open(nc.jetstream(), ack_wait_s=30)
