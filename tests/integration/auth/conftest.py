"""Auth tests get their own nats-server and worker: accounts live in NATS and switch authentication on for a
whole deployment, so they must not leak into the shared server the other integration tests use with auth off.
Two API replicas run with auth on against it; credentials are made through the same `Accounts` operations the
admin routes and CLI use."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from api.auth.accounts import Accounts
from api.auth.gate import default_limits
from broker.accounts import AccountStore
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from broker.rate_limits import RateLimiter
from common.settings import Settings
from contracts.accounts import RateLimits, Role
from tests.integration.harness import ApiServer, WorkerProcess, wait_healthy

UNLIMITED = RateLimits()


@pytest.fixture(scope="package")
def auth_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path_factory.mktemp("auth-nats")) as server:
        yield server


@pytest.fixture(scope="package")
def auth_settings(
    base_settings: Settings, auth_nats: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return base_settings.model_copy(
        update={"nats_url": auth_nats.url, "auth": "on", "data_dir": tmp_path_factory.mktemp("auth-data")}
    )


@pytest.fixture(scope="package")
def auth_worker(auth_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(auth_settings, tmp_path_factory.mktemp("auth-logs") / "worker.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="package")
async def replicas(auth_settings: Settings, auth_worker: WorkerProcess) -> AsyncIterator[list[ApiServer]]:
    """Two API replicas with auth on, sharing one NATS (and so every account and budget)."""
    servers = [ApiServer(auth_settings).start(), ApiServer(auth_settings).start()]
    try:
        for server in servers:
            await wait_healthy(server.base_url, auth_worker)  # /health is public
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="package")
def api_on(replicas: list[ApiServer]) -> ApiServer:
    return replicas[0]


@pytest.fixture(scope="package")
async def accounts(auth_settings: Settings, auth_nats: EmbeddedNatsServer) -> AsyncIterator[Accounts]:
    async with connect(auth_nats.url, "auth-tests") as nc:
        js = nc.jetstream()
        yield Accounts(
            await AccountStore.open(js),
            await RateLimiter.open(js),
            default_limits(auth_settings),
            auth_settings.login_token_ttl_s,
        )


@pytest.fixture(scope="package")
def make_key(accounts: Accounts):
    """`await make_key(role, limits)` → a fresh key (unlimited unless limits are given)."""

    async def make(role: Role = Role.CLIENT, limits: RateLimits | None = UNLIMITED, name: str = "test") -> str:
        _, key = await accounts.create_key(name, role, limits)
        return key

    return make


@pytest.fixture(scope="package")
async def role_keys(make_key) -> dict[Role, str]:
    return {role: await make_key(role, name=f"{role.value} key") for role in Role}


def frozen(server: ApiServer, now: float) -> None:
    """Pin a replica's clock, so a test's requests all fall in one rate-limit minute whenever it runs."""
    server.server.config.app.state.auth_gate.clock = lambda: now


@pytest.fixture
def now(replicas: list[ApiServer]) -> Iterator[float]:
    """Both replicas' clocks pinned to now for the test."""
    pinned = time.time()
    for server in replicas:
        frozen(server, pinned)
    yield pinned
    for server in replicas:
        server.server.config.app.state.auth_gate.clock = time.time


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
