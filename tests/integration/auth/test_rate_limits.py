"""Per-key budgets across two replicas: headers on every response, 429 with Retry-After past the limit, one
shared budget however requests are spread (fired concurrently), and token reservations settled to what the
completion really used. Each test pins the replicas' clocks, so all its requests fall in one minute."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from websockets.asyncio.client import connect as ws_connect

from api.auth.credentials import parse_bearer
from api.auth.gate import AuthGate
from api.auth.metering import reserve_for
from broker.connection import connect
from contracts import GenerateRequest, SamplingParams
from contracts.accounts import RateLimits, Role
from tests.integration.auth.conftest import headers
from tests.integration.test_batches import completion_line, read_lines, start_batch, wait_final
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


async def test_headers_count_down_then_429_with_retry_after(replicas, make_key, now) -> None:
    key = await make_key(Role.CLIENT, RateLimits(requests_per_minute=3, tokens_per_minute=150_000))
    async with httpx.AsyncClient(base_url=replicas[0].base_url, headers=headers(key)) as client:
        responses = [await client.get("/v1/models") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["2", "1", "0", "0"]
    reset = int(now // 60 + 1) * 60
    for response in responses:
        assert response.headers["x-ratelimit-limit"] == response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-reset"] == str(reset)
        assert response.headers["x-ratelimit-limit-tokens"] == "150000"
        assert response.headers["x-ratelimit-remaining-tokens"] == "150000"
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = responses[-1]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) == max(1, round(reset - now))


async def test_two_replicas_share_one_budget_under_concurrent_load(replicas, make_key, now) -> None:
    limit = 5
    key = await make_key(Role.CLIENT, RateLimits(requests_per_minute=limit))
    clients = [httpx.AsyncClient(base_url=server.base_url, headers=headers(key)) for server in replicas]
    try:
        responses = await asyncio.gather(*(clients[i % 2].get("/v1/models") for i in range(16)))
    finally:
        for client in clients:
            await client.aclose()
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == limit and statuses.count(429) == 16 - limit
    assert {response.url.port for response in responses if response.status_code == 200} <= {
        server.settings.port for server in replicas
    }


async def test_tokens_are_reserved_then_settled_to_the_usage(replicas, make_key, now) -> None:
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=1_000))
    async with httpx.AsyncClient(base_url=replicas[0].base_url, headers=headers(key), timeout=60) as client:
        response = await client.post(
            "/v1/completions",
            json={"model": TINY_MODEL_NAME, "prompt": "Hello there", "max_tokens": 300, "ignore_eos": True},
        )
    assert response.status_code == 200
    used = response.json()["usage"]["total_tokens"]
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1_000 - used)  # not 1000 - (prompt + 300)
    assert "x-ratelimit-limit-requests" not in response.headers  # unlimited dimensions are left out

    # A stream is settled when it ends, on whichever replica served it; the other replica sees the result.
    sdk = openai.AsyncOpenAI(base_url=f"{replicas[1].base_url}/v1", api_key=key, max_retries=0)
    stream = await sdk.completions.create(
        model=TINY_MODEL_NAME, prompt="Hello there", max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    streamed = [chunk async for chunk in stream][-1].usage.total_tokens
    async with httpx.AsyncClient(base_url=replicas[0].base_url, headers=headers(key)) as client:
        after = await client.get("/v1/models")
    assert after.headers["x-ratelimit-remaining-tokens"] == str(1_000 - used - streamed)


async def test_a_reservation_over_the_token_budget_is_refused_before_queueing(replicas, make_key, now) -> None:
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=50))
    async with httpx.AsyncClient(base_url=replicas[1].base_url, headers=headers(key)) as client:
        response = await client.post(
            "/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "Hello", "max_tokens": 100}
        )
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert "tokens per minute" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-ratelimit-remaining-tokens"] == "50"  # nothing was held
        small = await client.post(
            "/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
        )
        assert small.status_code == 200


async def test_login_attempts_are_limited_per_email(api_on, accounts, now) -> None:
    async with httpx.AsyncClient(base_url=api_on.base_url) as client:
        statuses = [
            (
                await client.post("/users/me/token", json={"email": "nobody@example.org", "password": "guess"})
            ).status_code
            for _ in range(11)
        ]
    assert statuses == [401] * 10 + [429]


async def test_websocket_messages_reserve_and_settle_tokens(replicas, make_key, now) -> None:
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=2_000))
    url = replicas[0].base_url.replace("http://", "ws://") + "/v1/completions"
    async with ws_connect(url, additional_headers=headers(key)) as ws:
        assert ws.response.headers["x-ratelimit-remaining-tokens"] == "2000"  # on the handshake
        used = 0
        for _ in range(2):
            await ws.send(
                json.dumps(
                    {
                        "model": TINY_MODEL_NAME,
                        "prompt": "Hello",
                        "max_tokens": 3,
                        "stream_options": {"include_usage": True},
                    }
                )
            )
            while (message := await ws.recv()) != "[DONE]":
                used += (json.loads(message).get("usage") or {}).get("total_tokens", 0)
    async with httpx.AsyncClient(base_url=replicas[1].base_url, headers=headers(key)) as client:
        after = await client.get("/v1/models")
    assert used and after.headers["x-ratelimit-remaining-tokens"] == str(2_000 - used)


async def test_background_work_is_charged_to_its_owner_without_refusal(
    api_on, auth_settings, auth_nats, make_key, now
) -> None:
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=100))
    owner = f"key:{parse_bearer(key).ids[0]}"
    async with connect(auth_nats.url, "batch-runner") as nc:
        gate = AuthGate(auth_settings, clock=lambda: now)
        await gate.open(nc.jetstream())
        meter = await gate.meter_for_owner(owner)
        held = await reserve_for(
            GenerateRequest(
                request_id="line-1",
                model=TINY_MODEL_NAME,
                reply_subject="x",
                prompt_token_ids=[1] * 90,
                sampling=SamplingParams(max_tokens=50),
            ),
            meter,
        )
        await held.settle(130)  # over the budget, and still not refused: a batch line must not fail for it
        assert await gate.meter_for_owner("key:0000000000000000") is None  # revoked or unknown: nothing to charge
    async with httpx.AsyncClient(base_url=api_on.base_url, headers=headers(key)) as client:
        refused = await client.post("/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": 1})
    assert refused.status_code == 429  # interactive requests of the same owner see the spent budget
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_batch_lines_count_against_the_owners_budget_without_failing(replicas, make_key, now) -> None:
    budget = 40  # less than the batch uses: every line must still run
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=budget))
    client = openai.AsyncOpenAI(base_url=f"{replicas[0].base_url}/v1", api_key=key, max_retries=0)
    lines = [completion_line(f"line-{i}", f"Tell me about {i}", max_tokens=8) for i in range(6)]
    batch = await wait_final(client, (await start_batch(client, lines)).id)
    assert batch.status == "completed" and batch.request_counts.completed == len(lines)
    outputs = await read_lines(client, batch.output_file_id)
    used = sum(line["response"]["body"]["usage"]["total_tokens"] for line in outputs)
    assert used > budget
    async with httpx.AsyncClient(base_url=replicas[1].base_url, headers=headers(key)) as other:
        after = await other.get("/v1/models")
        refused = await other.post("/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "Hi", "max_tokens": 1})
    assert after.headers["x-ratelimit-remaining-tokens"] == "0"  # the batch spent the owner's minute
    assert refused.status_code == 429


async def test_anthropic_messages_reserve_and_settle_like_chat(replicas, make_key, now) -> None:
    key = await make_key(Role.CLIENT, RateLimits(tokens_per_minute=200))
    body = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}
    async with httpx.AsyncClient(base_url=replicas[0].base_url, headers={"x-api-key": key}, timeout=60) as client:
        refused = await client.post("/v1/messages", json={**body, "max_tokens": 300})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["type"] == "error"
        assert refused.headers["x-ratelimit-remaining-tokens"] == "200"  # nothing was held
        answered = await client.post("/v1/messages", json={**body, "max_tokens": 20})
    assert answered.status_code == 200
    usage = answered.json()["usage"]
    assert answered.headers["x-ratelimit-remaining-tokens"] == str(200 - usage["input_tokens"] - usage["output_tokens"])
