"""When authentication is on. `auto` (the default): off for the one-command loopback start, on for every replica
from the moment any key or user exists, or when INFERQ_API_KEYS is set; `off` overrides. Each test gets a
fresh nats-server (no worker needed), so what it creates cannot switch anything else on."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from broker.embedded import EmbeddedNatsServer
from common.settings import Settings
from tests.integration.auth.conftest import headers
from tests.integration.harness import ApiServer

pytestmark = pytest.mark.asyncio


@pytest.fixture
def fresh_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("mode-nats")) as server:
        yield server


@pytest.fixture
def start(base_settings: Settings, fresh_nats: EmbeddedNatsServer) -> Iterator:
    servers: list[ApiServer] = []

    def started(**overrides) -> httpx.AsyncClient:
        server = ApiServer(base_settings.model_copy(update={"nats_url": fresh_nats.url, **overrides})).start()
        servers.append(server)
        return httpx.AsyncClient(base_url=server.base_url)

    yield started
    for server in servers:
        server.stop()


async def test_auto_is_open_until_the_first_key_then_closed_on_every_replica(start) -> None:
    first, second = start(auth="auto"), start(auth="auto")
    async with first, second:
        assert (await second.get("/v1/models")).status_code == 200
        assert (await second.get("/v1/models", headers=headers("anything"))).status_code == 200  # ignored
        created = await first.post("/admin/keys", json={"name": "first", "role": "admin"})
        assert created.status_code == 201
        assert (await second.get("/v1/models")).status_code == 401  # the other replica closed at once
        assert (await second.get("/v1/models", headers=headers(created.json()["key"]))).status_code == 200
        assert (await second.get("/health")).status_code in (200, 503)  # public either way


async def test_off_stays_open_even_with_keys(start) -> None:
    auto, off = start(auth="auto"), start(auth="off")
    async with auto, off:
        assert (await auto.post("/admin/keys", json={"name": "k", "role": "client"})).status_code == 201
        assert (await off.get("/admin/keys")).status_code == 200


async def test_api_keys_from_the_environment_turn_auth_on_with_their_roles(start) -> None:
    async with start(auth="auto", api_keys=["sk-env-admin", "client:sk-env-client"]) as client:
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers=headers("sk-env-client"))).status_code == 200
        assert (await client.get("/admin/keys", headers=headers("sk-env-client"))).status_code == 403
        assert (await client.get("/admin/keys", headers=headers("sk-env-admin"))).status_code == 200
        assert (await client.get("/v1/models", headers=headers("sk-env-other"))).status_code == 401


async def test_on_with_no_credentials_refuses_everyone_but_public_routes(start) -> None:
    async with start(auth="on") as client:
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/version")).status_code == 200
