"""A real nats-server per test module, and a client connection per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from broker.connection import connect
from broker.embedded import EmbeddedNatsServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("store")) as nats_server:
        yield nats_server


@pytest.fixture
async def nc(server: EmbeddedNatsServer) -> AsyncIterator:
    async with connect(server.url, "test") as client:
        yield client
