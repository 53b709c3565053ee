"""WebSocket streaming at the OpenAI paths with the `websockets` client: same chunks as SSE, several requests per
socket, errors as messages, and a closed socket cancels its generation."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect

from contracts import CancelRequest
from tests.integration.observe import observed
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

CHAT = {
    "model": TINY_MODEL_NAME,
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "max_tokens": 12,
    "temperature": 0,
}
COMPLETION = {
    "model": TINY_MODEL_NAME,
    "prompt": "Once upon a time",
    "max_tokens": 10,
    "temperature": 0,
    "ignore_eos": True,
}


def ws_url(api, path: str) -> str:
    return api.base_url.replace("http://", "ws://") + path


async def exchange(ws: ClientConnection, request: dict | str) -> list[dict]:
    """Send one request; every message up to `[DONE]`, parsed."""
    await ws.send(request if isinstance(request, str) else json.dumps(request))
    messages = []
    while (message := await asyncio.wait_for(ws.recv(), 60)) != "[DONE]":
        messages.append(json.loads(message))
    return messages


@pytest.fixture(scope="module")
def sdk(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)


async def test_chat_chunks_match_the_sse_stream(api, sdk) -> None:
    sse = [
        chunk.model_dump(exclude_unset=True)
        async for chunk in await sdk.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
    ]
    async with connect(ws_url(api, "/v1/chat/completions")) as ws:
        frames = await exchange(ws, {**CHAT, "stream_options": {"include_usage": True}})
    assert all(frame["object"] == "chat.completion.chunk" for frame in frames)

    def content(chunks: list[dict]) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert content(frames) == content(sse) and content(frames)
    assert frames[0]["choices"][0]["delta"]["role"] == "assistant"

    # The same counts; the second of the two identical requests may find its prompt in the prefix cache.
    def counts(usage: dict) -> dict:
        return {key: value for key, value in usage.items() if key != "prompt_tokens_details"}

    assert counts(frames[-1]["usage"]) == counts(sse[-1]["usage"])
    finish = [c["choices"][0]["finish_reason"] for c in frames if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [
        c["choices"][0]["finish_reason"] for c in sse if c["choices"] and c["choices"][0].get("finish_reason")
    ]


async def test_several_completions_over_one_socket(api) -> None:
    prompts = ["Once upon a time", "The weather today", "In a galaxy far away"]
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        expected = [
            (await http.post("/v1/completions", json={**COMPLETION, "prompt": p})).json()["choices"][0]["text"]
            for p in prompts
        ]
    async with connect(ws_url(api, "/v1/completions")) as ws:
        for prompt, text in zip(prompts, expected, strict=True):
            frames = await exchange(ws, {**COMPLETION, "prompt": prompt})
            assert all(frame["object"] == "text_completion" for frame in frames)
            assert "".join(frame["choices"][0]["text"] for frame in frames) == text
            assert frames[-1]["choices"][0]["finish_reason"] == "length"


async def test_errors_are_messages_and_the_socket_stays_usable(api) -> None:
    async with connect(ws_url(api, "/v1/completions")) as ws:
        [garbage] = await exchange(ws, "this is not json")
        assert garbage["error"]["code"] == "invalid_request"
        [not_an_object] = await exchange(ws, "[1, 2, 3]")
        assert "JSON object" in not_an_object["error"]["message"]
        [invalid] = await exchange(ws, {"prompt": "no model"})
        assert invalid["error"]["code"] == "invalid_request" and invalid["error"]["param"] == "model"
        [unknown] = await exchange(ws, {**COMPLETION, "model": "no-such-model"})
        assert unknown["error"]["code"] == "model_not_found"
        [best_of] = await exchange(ws, {**COMPLETION, "best_of": 2})
        assert "cannot be streamed" in best_of["error"]["message"]
        await ws.send(b'{"model": "tiny-llama", "prompt": "bytes work too", "max_tokens": 2}')
        frames = []
        while (message := await asyncio.wait_for(ws.recv(), 60)) != "[DONE]":
            frames.append(json.loads(message))
        assert frames and "error" not in frames[0]
        assert "".join(f["choices"][0]["text"] for f in await exchange(ws, COMPLETION))


async def test_closing_the_socket_cancels_the_generation(api, nats_server) -> None:
    async with observed(nats_server.url, "inf.cancel.*", CancelRequest.from_bytes) as cancels:
        async with connect(ws_url(api, "/v1/chat/completions")) as ws:
            await ws.send(json.dumps({**CHAT, "max_tokens": 400, "ignore_eos": True}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 60))
            second = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert second["choices"]  # generation is under way
        cancel = await asyncio.wait_for(cancels.get(), 5)
    assert cancel.request_id == first["id"]
