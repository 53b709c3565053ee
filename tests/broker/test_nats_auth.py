"""Distributed mode: a NATS server that requires a user and password refuses clients without them, and
`connect()` (which every worker, API and the CLI use) authenticates with what the settings say. Local tools
find the embedded server of a running `inferq serve` by its ports file."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.connection import NatsAuth, connect
from broker.embedded import EmbeddedNatsServer, running_server_url
from broker.errors import BrokerUnavailable
from common.settings import Settings

AUTH = NatsAuth(user="inferq", password="nats-password-from-settings")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedNatsServer(tmp_path_factory.mktemp("secured"), auth=AUTH) as server:
        yield server


async def test_credentials_are_required_and_used(secured: EmbeddedNatsServer) -> None:
    with pytest.raises(BrokerUnavailable, match="refused anonymous's credentials"):  # at once, not retried forever
        async with connect(secured.url, "anonymous"):
            pass
    settings = Settings(nats_url=secured.url, nats_user="inferq", nats_password="nats-password-from-settings")
    async with connect(secured.url, "worker", auth=NatsAuth.from_settings(settings)) as nc:
        await nc.jetstream().account_info()
    assert "nats-password" not in repr(NatsAuth.from_settings(settings))
    config = secured.run_dir / "nats.conf"
    assert config.stat().st_mode & 0o077 == 0  # the config holding the password is private


def test_the_embedded_server_of_a_running_serve_is_found(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    assert running_server_url(store) is None
    with EmbeddedNatsServer(store) as server:
        assert running_server_url(store) == server.url
        assert server.url.startswith("nats://127.0.0.1:")  # loopback only
