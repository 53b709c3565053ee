"""Who gets in where, against two real replicas with auth on: every role against every route class, 401 for a
missing or wrong credential, 403 for a role without the route, WebSocket handshakes refused the same way,
login tokens (Aleph Alpha's `POST /users/me/token`) that expire and can be revoked, and the admin routes."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from api.auth.credentials import login_token, new_id, new_secret, sha256_hex, user_id_for
from contracts.accounts import LoginTokenRecord, Role
from tests.integration.auth.conftest import headers
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
A, W, C, M = Role.ADMIN, Role.WORKER, Role.CLIENT, Role.MONITOR

# One real request per route class, and the roles that may make it.
ROUTES = [
    ("GET", "/v1/models", None, {A, C, W}),
    ("POST", "/v1/completions", {"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": 1}, {A, C}),
    ("POST", "/tokenize", {"model": TINY_MODEL_NAME, "prompt": "Hi"}, {A, C}),
    ("GET", "/models_available", None, {A, C}),
    ("GET", "/v1/gpu/info", None, {A, M, W}),
    ("GET", "/metrics", None, {A, M}),
    ("GET", "/metrics/cluster", None, {A, M}),
    ("GET", "/api/v1/deployments", None, {A, M, C}),
    ("GET", "/v1/batches", None, {A, C}),
    ("GET", "/admin/keys", None, {A}),
]

ALEPH_ONLY = {"/models_available"}


async def call(client: httpx.AsyncClient, method: str, path: str, body: dict | None, key: str | None):
    return await client.request(method, path, json=body, headers=headers(key) if key else {})


@pytest.mark.parametrize(("method", "path", "body", "allowed"), ROUTES, ids=[r[1] for r in ROUTES])
async def test_each_role_against_each_route_class(replicas, role_keys, method, path, body, allowed) -> None:
    async with httpx.AsyncClient(base_url=replicas[1].base_url, timeout=60) as client:
        for role, key in role_keys.items():
            response = await call(client, method, path, body, key)
            if role in allowed:
                assert response.status_code not in (401, 403), (role, response.text)
            elif path in ALEPH_ONLY:  # the aleph-alpha-client's PermissionError is a 401 (docs/api.md)
                assert response.status_code == 401, (role, response.text)
                assert response.json()["error"]["code"] == "permission_denied"
            else:
                assert response.status_code == 403, (role, response.text)
                assert response.json()["error"]["type"] == "permission_error"
        missing = await call(client, method, path, body, None)
        wrong = await call(client, method, path, body, "iq_0123456789abcdef_not-the-secret")
        for response in (missing, wrong):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"


async def test_health_and_version_need_no_credential(api_on) -> None:
    async with httpx.AsyncClient(base_url=api_on.base_url) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/version")).status_code == 200


async def test_websocket_handshakes_are_refused_without_the_role(api_on, role_keys) -> None:
    url = api_on.base_url.replace("http://", "ws://") + "/v1/chat/completions"
    for key in (None, "wrong", role_keys[Role.MONITOR]):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(url, additional_headers=headers(key) if key else {}):
                pass
        assert refused.value.response.status_code == 403  # a close before accept fails the handshake
    async with ws_connect(url, additional_headers=headers(role_keys[Role.CLIENT])) as ws:
        await ws.send(
            json.dumps({"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        )
        while (await ws.recv()) != "[DONE]":
            pass


async def test_login_token_works_until_logout_on_every_replica(replicas, accounts) -> None:
    await accounts.add_user("Carol@Example.org", "correct horse battery", Role.CLIENT)
    first, second = (httpx.AsyncClient(base_url=server.base_url) for server in replicas)
    async with first, second:
        wrong = await first.post("/users/me/token", json={"email": "carol@example.org", "password": "nope"})
        unknown = await first.post("/users/me/token", json={"email": "dan@example.org", "password": "nope"})
        assert wrong.status_code == unknown.status_code == 401
        assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]
        login = await first.post(
            "/users/me/token", json={"email": "carol@example.org", "password": "correct horse battery"}
        )
        assert login.status_code == 200 and login.json()["role"] == "client"
        token = login.json()["token"]
        assert (await second.get("/v1/models", headers=headers(token))).status_code == 200
        assert (await second.get("/admin/users", headers=headers(token))).status_code == 403
        assert (await second.delete("/users/me/token", headers=headers(token))).json() == {"revoked": True}
        assert (await first.get("/v1/models", headers=headers(token))).status_code == 401


async def test_expired_tokens_and_removed_users_are_refused(api_on, accounts) -> None:
    user = await accounts.add_user("erin@example.org", "correct horse battery", Role.CLIENT)
    now, secret = time.time(), new_secret()
    expired = LoginTokenRecord(
        token_id=new_id(),
        user_id=user.user_id,
        secret_sha256=sha256_hex(secret),
        created_at=now - 120,
        expires_at=now - 60,
    )
    await accounts.store.add_token(expired, ttl_s=60)
    token, _ = await accounts.login("erin@example.org", "correct horse battery")
    async with httpx.AsyncClient(base_url=api_on.base_url) as client:
        stale = login_token(user.user_id, expired.token_id, secret)
        assert (await client.get("/v1/models", headers=headers(stale))).status_code == 401
        assert (await client.get("/v1/models", headers=headers(token))).status_code == 200
        assert await accounts.remove_user("erin@example.org")
        assert (await client.get("/v1/models", headers=headers(token))).status_code == 401
    assert user.user_id == user_id_for("ERIN@example.org")


async def test_admins_manage_keys_and_users_and_revocation_is_immediate(replicas, role_keys) -> None:
    admin = headers(role_keys[Role.ADMIN])
    first, second = (httpx.AsyncClient(base_url=server.base_url, headers=admin) for server in replicas)
    async with first, second:
        created = await first.post(
            "/admin/keys", json={"name": "ci", "role": "client", "limits": {"requests_per_day": None}}
        )
        assert created.status_code == 201
        body = created.json()
        assert body["limits"] == {"requests_per_minute": 60, "tokens_per_minute": 150_000, "requests_per_day": None}
        key = body["key"]
        assert key not in (await first.get("/admin/keys")).text  # listings never show secrets
        assert body["id"] in (await first.get("/admin/keys")).text
        assert (await second.get("/v1/models", headers=headers(key))).status_code == 200
        assert (await first.delete(f"/admin/keys/{body['id']}")).status_code == 200
        assert (await second.get("/v1/models", headers=headers(key))).status_code == 401

        user = await first.post(
            "/admin/users", json={"email": "fay@example.org", "password": "long enough pw", "role": "monitor"}
        )
        assert user.status_code == 201 and user.json()["role"] == "monitor"
        again = await first.post("/admin/users", json={"email": "FAY@example.org", "password": "long enough pw"})
        assert again.status_code == 409
        assert "password" not in (await first.get("/admin/users")).text
        assert (await first.delete("/admin/users/fay@example.org")).status_code == 200
        assert (await first.post("/admin/keys", json={"name": "x", "role": "boss"})).status_code == 400
