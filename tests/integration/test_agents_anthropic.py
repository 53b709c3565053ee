"""The Anthropic SDK's own agent loop (`client.beta.messages.tool_runner`, with a `@beta_async_tool` function) on
/v1/messages against the real path (API → NATS → worker on the tiny random model), plain and streamed: the model is
made to call the tool (tool_use), the runner runs it and sends the tool_result back, and the model answers. The runner
asks for a server-held thread first; the refusal carries the details that make it go on without one."""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import pytest
from anthropic import beta_async_tool

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

CITIES = ("Oslo", "Paris")


@pytest.fixture
async def sent() -> list[dict]:
    """The bodies the client posts, as they went out."""
    return []


@pytest.fixture
async def client(api, sent: list[dict]):
    async def record(request) -> None:  # the SDK's own httpx (httpx2) request
        sent.append(json.loads(request.content))

    http = anthropic.DefaultAsyncHttpxClient(event_hooks={"request": [record]})
    async with anthropic.AsyncAnthropic(
        base_url=api.base_url, api_key="unused", max_retries=0, timeout=120, http_client=http
    ) as client:
        yield client


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_the_tool_runner_runs_its_loop_on_messages(client, sent: list[dict], stream: bool) -> None:
    calls: list[str] = []

    @beta_async_tool
    async def get_weather(city: Literal["Oslo", "Paris"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"21 degrees and sunny in {city}"

    runner = client.beta.messages.tool_runner(
        model=TINY_MODEL_NAME,
        # Room for the forced call: JSON grammars allow whitespace between tokens, and a random model often picks
        # it where the grammar leaves few choices, so a call can take many more tokens than its text needs.
        max_tokens=256,
        system="You tell the weather. Use the tool.",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[get_weather],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        max_iterations=4,
        stream=stream,
    )
    replies = []
    async for item in runner:
        reply = await item.get_final_message() if stream else item
        replies.append(reply)
        if reply.stop_reason == "tool_use":
            # Force one call, then an answer (a random model left to `auto` may call tools until max_iterations).
            runner.set_messages_params(lambda params: {**params, "tool_choice": {"type": "none"}})

    assert len(calls) == 1 and calls[0] in CITIES, calls  # the runner ran the tool once, with a valid input
    first, answer = replies
    [tool_use] = first.content
    assert (tool_use.type, tool_use.name, tool_use.input) == ("tool_use", "get_weather", {"city": calls[0]})
    assert first.stop_reason == "tool_use"
    assert [block.type for block in answer.content] == ["text"] and answer.stop_reason in ("end_turn", "max_tokens")
    # The runner asked for a server-held thread first; refused in its terms, it went on without one.
    threaded, *turns = sent
    assert "thread" in threaded and not any("thread" in body for body in turns)
    # The answer's request carried the question, the call and its result.
    assert len(turns) == 2 and turns[1]["tool_choice"] == {"type": "none"}
    question, call, result = turns[1]["messages"]
    assert call["role"] == "assistant" and [block["id"] for block in call["content"]] == [tool_use.id]
    [block] = result["content"]
    assert (block["type"], block["tool_use_id"]) == ("tool_result", tool_use.id)
