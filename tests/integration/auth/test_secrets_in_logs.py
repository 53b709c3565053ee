"""No secret reaches a log line: the service's own logging pipeline (`configure_logging`, at debug level, the
most verbose) renders everything emitted in this process (structlog events; uvicorn, websockets and nats records)
while keys are created, used, refused and revoked and users log in and out, and the output is searched for
every secret used. Libraries do log credentials at debug level (`websockets` logs each handshake header), so
this also proves the pipeline masks them."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
import structlog
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from api.auth.credentials import parse_bearer, user_id_for
from common.logging import configure_logging
from contracts.accounts import Role
from tests.integration.auth.conftest import headers

pytestmark = pytest.mark.asyncio


@pytest.fixture
def captured_logs() -> Iterator[Callable[[], str]]:
    """Everything the service's logging writes from now on, as text; the previous configuration after."""
    saved_structlog, root = structlog.get_config(), logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    configure_logging("debug", "json")
    output = io.StringIO()
    root.handlers[0].setStream(output)  # the handler configure_logging made, writing into our buffer
    try:
        yield output.getvalue
    finally:
        structlog.configure(**saved_structlog)
        root.handlers[:], level = saved_root
        root.setLevel(level)


async def test_no_secret_is_ever_logged(replicas, role_keys, accounts, captured_logs) -> None:
    admin_key = role_keys[Role.ADMIN]
    password, wrong_password = "the users secret password", "a wrong secret password"
    wrong_keys = ["iq_0123456789abcdef_wrong-secret-part", "sk-guessed-secret-value"]
    query_secret, header_secret = "sk-opaque-key-in-a-query", "opaque-key-in-a-header"
    first, second = (httpx.AsyncClient(base_url=server.base_url, timeout=60) for server in replicas)
    async with first, second:
        created = await first.post(
            "/admin/keys", json={"name": "logged?", "role": "client"}, headers=headers(admin_key)
        )
        new_key = created.json()["key"]
        assert (await second.get("/v1/models", headers=headers(new_key))).status_code == 200
        counted = await second.post(
            "/v1/messages/count_tokens",
            headers={"x-api-key": new_key},  # Anthropic's header
            json={"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert counted.status_code == 200
        assert (await second.get("/admin/keys", headers=headers(new_key))).status_code == 403
        for wrong in wrong_keys:
            assert (await second.get("/v1/models", headers=headers(wrong))).status_code == 401
        await first.post(
            "/admin/users", json={"email": "log@example.org", "password": password}, headers=headers(admin_key)
        )
        refused = await second.post("/users/me/token", json={"email": "log@example.org", "password": wrong_password})
        assert refused.status_code == 401
        token = (await second.post("/users/me/token", json={"email": "log@example.org", "password": password})).json()[
            "token"
        ]
        url = replicas[0].base_url.replace("http://", "ws://") + "/v1/completions"
        async with ws_connect(url, additional_headers=headers(token)) as ws:
            await ws.send('{"model": "tiny-llama", "prompt": "Hi", "max_tokens": 1}')
            while (await ws.recv()) != "[DONE]":
                pass
        # A key in the query string (browsers cannot set headers on a WebSocket, so people try): refused, and
        # uvicorn logs the handshake's path with its query string.
        query = f"?api_key={query_secret}&access_token={token}"
        with pytest.raises(InvalidStatus):
            async with ws_connect(url + query):
                pass
        assert (await first.get("/v1/models", headers={"X-Api-Key": header_secret})).status_code == 401
        assert (await first.delete("/users/me/token", headers=headers(token))).status_code == 200
        assert (await first.get("/v1/models", headers=headers(token))).status_code == 401
        await first.delete(f"/admin/keys/{created.json()['id']}", headers=headers(admin_key))
    user = await accounts.store.get_user(user_id_for("log@example.org"))
    # What a careless library or handler might do; the pipeline masks it.
    logging.getLogger("some.library").debug("sending Authorization: Bearer %s", new_key)
    structlog.get_logger("some.handler").warning(
        "request failed", headers={"authorization": f"Bearer {token}"}, key=admin_key
    )
    logging.getLogger("some.library").debug("sending x-api-key: %s", new_key)

    events = captured_logs()
    lines = events.splitlines()
    assert "accounts.key_created" in events and "auth.unauthenticated" in events  # the capture saw the run
    assert events.count("[redacted]") >= 2  # the two deliberate lines below, and any library's
    assert '"WebSocket /v1/completions?api_key=[redacted]' in events  # the capture saw the handshake line
    secrets = [
        admin_key,
        new_key,
        password,
        wrong_password,
        token,
        *wrong_keys,
        user.password_argon2,
        query_secret,
        header_secret,
    ]
    secrets += [parse_bearer(secret).secret for secret in (admin_key, new_key, token)]  # the secret parts alone
    leaked = [secret for secret in secrets if secret in events]
    assert not leaked, [line[:300] for line in lines if any(secret in line for secret in leaked)]
