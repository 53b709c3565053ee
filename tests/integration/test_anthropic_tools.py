"""Tool use on /v1/messages with the official `anthropic` SDK against the real path (API → NATS → worker on the
tiny random model): `any` and a named `tool` choice are forced by the grammar, so every tool_use block has a valid
input; the stream's input_json_delta fragments reassemble into that input; a tool_result continues the
conversation; bad tool input is a 400 in Anthropic's error shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.integration.test_anthropic_api import assert_anthropic_error
from tests.integration.test_responses_tools import WEATHER as RESPONSES_WEATHER
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": RESPONSES_WEATHER["parameters"],
}
TIME = {
    "name": "get_time",
    "description": "The time now.",
    "input_schema": {"type": "object", "properties": {}, "additionalProperties": False},
}
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture
async def client(api):
    async with anthropic.AsyncAnthropic(base_url=api.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def _check_weather(block) -> None:
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_"), block
    assert set(block.input) == {"city", "unit"} and block.input["unit"] in ("c", "f")
    assert isinstance(block.input["city"], str) and len(block.input["city"]) <= 12


async def _forced(client, **kwargs) -> anthropic.types.Message:
    fields = {"tools": [WEATHER, TIME], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, **kwargs}
    return await client.messages.create(
        model=TINY_MODEL_NAME, max_tokens=200, messages=QUESTION, extra_body={"temperature": 1.0}, **fields
    )


async def test_tool_choice_any_answers_with_a_tool_use_block(client) -> None:
    for _ in range(3):  # sampled: three different answers, each a valid call
        message = await _forced(client, tools=[WEATHER])
        assert message.stop_reason == "tool_use", message
        [block] = message.content  # a forced call has no text, and one call with parallel use disabled
        _check_weather(block)


async def test_a_named_tool_choice_calls_that_tool(client) -> None:
    # One call: with parallel use allowed, a sampled random model may go on adding calls until max_tokens (a CI
    # run once did); the forced choice of the named tool is what this test is about.
    message = await _forced(client, tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True})
    assert message.stop_reason == "tool_use", message
    [block] = message.content
    assert (block.type, block.name, block.input) == ("tool_use", "get_time", {}), block
    assert block.id.startswith("toolu_")


async def test_stream_reassembles_input_json_deltas_into_the_input(client) -> None:
    async with client.messages.stream(
        model=TINY_MODEL_NAME,
        max_tokens=200,
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={"temperature": 1.0},
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    starts = [event for event in events if event.type == "content_block_start"]
    assert [start.content_block.type for start in starts] == ["tool_use"]
    assert starts[0].content_block.input == {} and starts[0].index == 0
    fragments = [
        event.delta.partial_json
        for event in events
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
    ]
    assert len(fragments) > 1  # really streamed, in pieces
    [block] = final.content
    _check_weather(block)
    assert final.stop_reason == "tool_use" and block.id == starts[0].content_block.id
    assert json.loads("".join(fragments)) == block.input
    assert [event.type for event in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_a_tool_result_round_trip(client) -> None:
    first = await _forced(client, tools=[WEATHER])
    [call] = first.content
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "21 degrees, sunny"},
                {"type": "text", "text": "Summarise."},
            ],
        },
    ]
    answer = await client.messages.create(
        model=TINY_MODEL_NAME,
        max_tokens=8,
        messages=conversation,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        extra_body={"temperature": 0},
    )
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")
    # The call and its result are part of the prompt, and count_tokens counts the same prompt.
    counted = await client.messages.count_tokens(
        model=TINY_MODEL_NAME, messages=conversation, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert counted.input_tokens == answer.usage.input_tokens
    without = await client.messages.count_tokens(model=TINY_MODEL_NAME, messages=QUESTION)
    assert counted.input_tokens > without.input_tokens + 10


async def test_count_tokens_counts_the_tools(client) -> None:
    bare = await client.messages.count_tokens(model=TINY_MODEL_NAME, messages=QUESTION)
    offered = await client.messages.count_tokens(model=TINY_MODEL_NAME, messages=QUESTION, tools=[WEATHER])
    assert offered.input_tokens > bare.input_tokens + 20  # the tool listing is in the prompt


BAD = [
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}
            ]
        },
        "no tool_use block with that id",
    ),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_time"}}, "'get_time', which is not among"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "name"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ({"tools": [{"name": "f"}]}, "input_schema"),
    ({"tool_choice": {"type": "any"}}, "tool_choice needs tools"),
    (
        {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
        "user messages cannot hold tool_use blocks",
    ),
    (
        {
            "messages": [
                *QUESTION,
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
            ],
            "tools": [WEATHER],
        },
        "answer them with tool_result",
    ),
]


@pytest.mark.parametrize(("change", "needle"), BAD, ids=[needle for _, needle in BAD])
async def test_bad_tool_input_is_a_400_in_anthropic_shape(api, change, needle) -> None:
    body = {"model": TINY_MODEL_NAME, "max_tokens": 4, "messages": QUESTION} | change
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        assert_anthropic_error(await http.post("/v1/messages", json=body), 400, "invalid_request_error", needle)
