"""Tenant isolation (issue 23) through the HTTP API, with real keys of different owners and roles against two
replicas with auth on: nobody gets another owner's request back, whichever way they name it (SSE
Last-Event-ID resume, Idempotency-Key / X-Request-Id attach), on every route that can, and the answer for
someone else's id is the answer for an id that never existed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from api.auth.credentials import user_id_for
from broker import kv, subjects
from broker.connection import connect
from contracts.accounts import RateLimits, Role
from tests.integration.auth.conftest import frozen, headers
from tests.integration.harness import ApiServer
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

# (path, response id prefix, body): every route that resumes or attaches a request.
RESUMABLE = [
    (
        "/v1/chat/completions",
        "chatcmpl",
        {
            "model": TINY_MODEL_NAME,
            "messages": [{"role": "user", "content": "Repeat exactly: the vault code is 4471"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    ),
    (
        "/v1/completions",
        "cmpl",
        {"model": TINY_MODEL_NAME, "prompt": "the vault code is 4471", "max_tokens": 6, "temperature": 0},
    ),
]
UNRELATED = {
    "/v1/chat/completions": {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "stream": True,
    },
    "/v1/completions": {"model": TINY_MODEL_NAME, "prompt": "Hello", "max_tokens": 6, "stream": True},
}


def _without_id(response: httpx.Response, request_id: str) -> tuple[int, dict]:
    body = response.json()
    body["error"]["message"] = body["error"]["message"].replace(request_id, "<id>")
    return response.status_code, body


async def _sse_ids(response: httpx.Response) -> list[str]:
    return [line.removeprefix("id: ") async for line in response.aiter_lines() if line.startswith("id: ")]


@pytest.mark.parametrize(("path", "prefix", "body"), RESUMABLE, ids=[r[0] for r in RESUMABLE])
async def test_another_owners_stream_cannot_be_resumed(replicas, make_key, path, prefix, body) -> None:
    victim, attacker = await make_key(Role.CLIENT), await make_key(Role.CLIENT)
    first, second = (httpx.AsyncClient(base_url=server.base_url, timeout=60) for server in replicas)
    async with first, second:
        answer = await first.post(path, json=body, headers=headers(victim))
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["id"]
        stolen = await second.post(
            path, json=UNRELATED[path], headers={**headers(attacker), "Last-Event-ID": f"{request_id}/0"}
        )
        unknown_id = f"{prefix}-{'0' * 32}"
        unknown = await second.post(
            path, json=UNRELATED[path], headers={**headers(attacker), "Last-Event-ID": f"{unknown_id}/0"}
        )
        assert stolen.status_code == 404, stolen.text[:300]
        assert _without_id(stolen, request_id) == _without_id(unknown, unknown_id)  # indistinguishable
        # The owner still resumes its own stream, on either replica.
        async with second.stream(
            "POST", path, json={**body, "stream": True}, headers={**headers(victim), "Last-Event-ID": f"{request_id}/0"}
        ) as resumed:
            assert resumed.status_code == 200
            ids = await _sse_ids(resumed)
        assert ids and all(event_id.startswith(f"{request_id}/") for event_id in ids)
        assert ids[0] == f"{request_id}/1"


@pytest.mark.parametrize(("path", "prefix", "body"), RESUMABLE, ids=[r[0] for r in RESUMABLE])
@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Request-Id"])
async def test_the_same_client_key_never_attaches_to_another_owners_request(
    replicas, make_key, path, prefix, body, header
) -> None:
    victim, attacker = await make_key(Role.CLIENT), await make_key(Role.CLIENT)
    key = {header: f"order-{path}-{header}"}
    async with httpx.AsyncClient(base_url=replicas[0].base_url, timeout=60) as client:
        mine = (await client.post(path, json=body, headers={**headers(victim), **key})).json()
        again = (await client.post(path, json=body, headers={**headers(victim), **key})).json()
        async with client.stream("POST", path, json=UNRELATED[path], headers={**headers(attacker), **key}) as theirs:
            assert theirs.status_code == 200
            chunks = [
                json.loads(line.removeprefix("data: "))
                async for line in theirs.aiter_lines()
                if line.startswith("data: {")
            ]
    assert again["id"] == mine["id"]  # the owner's retry attaches
    assert {chunk["id"] for chunk in chunks} != {mine["id"]}  # the other owner's same key is another request
    assert all(chunk["id"].startswith(f"{prefix}-") for chunk in chunks)


# --- token budgets: an unset limit reserves what the request may really generate -----------------------------


UNBOUNDED = [  # requests that leave out their token limit, on every generating route
    ("/v1/chat/completions", {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}),
    (
        "/v1/chat/completions",
        {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 150},
    ),  # 2 × 150 + the prompt: n multiplies
    ("/v1/completions", {"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": None}),
    ("/v1/completions", {"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": 60, "n": 1, "best_of": 5}),
    ("/complete", {"model": TINY_MODEL_NAME, "prompt": "Hi"}),  # Aleph Alpha: no maximum_tokens
]


async def test_leaving_out_max_tokens_reserves_the_rest_of_the_context(replicas, make_key, now) -> None:
    budget = 300  # less than the tiny model's context (512) and less than 2 × 150 or 5 × 60 plus a prompt
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=budget))
    async with httpx.AsyncClient(base_url=replicas[0].base_url, headers=headers(key), timeout=60) as client:
        for path, body in UNBOUNDED:
            refused = await client.post(path, json=body)
            assert refused.status_code == 429, (path, body, refused.status_code, refused.text[:200])
            assert "tokens per minute" in refused.json()["error"]["message"]
            assert refused.headers["x-ratelimit-remaining-tokens"] == str(budget)  # nothing was held or spent
        fits = await client.post("/v1/chat/completions", json={**UNBOUNDED[0][1], "max_tokens": 4})
        assert fits.status_code == 200, fits.text


# --- consistency: Aleph refusals, batch windows ---------------------------------------------------------------


async def test_aleph_routes_refuse_a_role_with_401_as_its_client_expects(api_on, role_keys) -> None:
    monitor = headers(role_keys[Role.MONITOR])
    async with httpx.AsyncClient(base_url=api_on.base_url, headers=monitor) as client:
        aleph = await client.post("/complete", json={"model": TINY_MODEL_NAME, "prompt": "Hi", "maximum_tokens": 1})
        openai = await client.post("/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "Hi"})
    assert aleph.status_code == 401 and aleph.json()["error"]["code"] == "permission_denied"
    assert "www-authenticate" not in aleph.headers  # the credential is fine; the role is not
    assert openai.status_code == 403 and openai.json()["error"]["type"] == "permission_error"


async def test_a_batch_completion_window_has_an_upper_bound(api_on, role_keys) -> None:
    async with httpx.AsyncClient(base_url=api_on.base_url, headers=headers(role_keys[Role.CLIENT])) as client:
        response = await client.post(
            "/v1/batches",
            json={"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": "99999999999d"},
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "completion_window"
    assert "at most 7d" in response.json()["error"]["message"]


# --- the public login route: capped per client address and in all, leaving nothing behind for unknown emails ---


@pytest.fixture
async def login_capped(auth_settings, auth_worker):
    """A replica of its own with small login caps: 3 per address, 8 in all."""
    server = ApiServer(
        auth_settings.model_copy(update={"login_attempts_per_minute": 8, "login_attempts_per_minute_per_address": 3})
    ).start()
    yield server
    server.stop()


def _pin_in_a_fresh_minute(server: ApiServer, minutes_ahead: int, second: float) -> None:
    """Pin the replica's clock `second` s into a minute ahead, where no other test counted anything."""
    frozen(server, (time.time() // 60 + minutes_ahead) * 60 + second)


async def _login_from(server: ApiServer, address: str, email: str) -> int:
    transport = httpx.AsyncHTTPTransport(local_address=address)  # loopback: any 127.x source works on Linux
    async with httpx.AsyncClient(base_url=server.base_url, transport=transport, timeout=30) as client:
        response = await client.post("/users/me/token", json={"email": email, "password": "a guess"})
    return response.status_code


async def test_logins_are_capped_per_address_and_in_all(login_capped) -> None:
    _pin_in_a_fresh_minute(login_capped, 60, 1.0)
    one_address = [await _login_from(login_capped, "127.0.0.2", f"nobody-{i}@example.org") for i in range(4)]
    assert one_address == [401, 401, 401, 429]  # distinct emails: the per-email limit alone never bound
    others = [await _login_from(login_capped, f"127.0.0.{i}", f"someone-{i}@example.org") for i in range(3, 9)]
    assert others == [401] * 5 + [429]  # 8 in all, whatever the address


async def test_unknown_emails_leave_no_entry_behind(login_capped, auth_nats) -> None:
    # Half a second before the minute ends: the login's entries expire with it, two seconds after they are made.
    _pin_in_a_fresh_minute(login_capped, 70, 59.5)
    assert await _login_from(login_capped, "127.0.0.9", "never-a-user@example.org") == 401
    async with connect(auth_nats.url, "login-entries") as nc:
        bucket = await nc.jetstream().key_value(subjects.RATE_LIMIT_BUCKET)
        left = [
            subjects.rate_limit_key(f"login:{user_id_for('never-a-user@example.org')}"),
            subjects.rate_limit_key("login-address:127.0.0.9"),
        ]
        deadline = time.monotonic() + 15
        while any([await kv.read(bucket, key) for key in left]):
            assert time.monotonic() < deadline, "login entries of an unknown email and its address are still stored"
            await asyncio.sleep(0.25)
