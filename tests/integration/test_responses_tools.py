"""Function calling on /v1/responses with the official openai SDK against the real path (API → NATS → worker on the
tiny random model): `required` and named choices are forced by the grammar, so every call parses; a
function_call_output continues the conversation (by previous_response_id or by sending the items back); the
stream has OpenAI's function-call events; a background response reads its calls as a foreground one does."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import ResponseFunctionToolCall

from tests.api.tools.test_tools import WEATHER as CHAT_WEATHER
from tests.integration.test_responses_api import _wait_finished
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

WEATHER = {  # chat's weather tool (a bounded city, so even random text ends) in the Responses flat shape
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": CHAT_WEATHER.function.parameters,
    "strict": True,
}
TIME = {"type": "function", "name": "get_time", "description": "The time now.", "parameters": None, "strict": False}


@pytest.fixture(scope="module")
def client(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _create(**fields) -> dict:
    return {"model": TINY_MODEL_NAME, "temperature": 1.0, "max_output_tokens": 200, **fields}


def _calls(response) -> list[ResponseFunctionToolCall]:
    return [item for item in response.output if item.type == "function_call"]


def _check_weather(call: ResponseFunctionToolCall) -> None:
    arguments = json.loads(call.arguments)
    assert call.name == "get_weather" and set(arguments) == {"city", "unit"}, call
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12 and arguments["unit"] in ("c", "f")


async def test_required_makes_a_function_call_with_parseable_arguments(client) -> None:
    for _ in range(3):  # sampled at temperature 1: three different answers, each a valid call
        response = await client.responses.create(
            **_create(input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
        )
        assert response.status == "completed", response.output
        [call] = _calls(response)  # parallel_tool_calls false: exactly one
        _check_weather(call)
        assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
        assert response.tool_choice == "required" and response.tools[0].name == "get_weather"
    stored = await client.responses.retrieve(response.id)
    assert stored.output == response.output


async def test_a_named_choice_calls_that_function(client) -> None:
    response = await client.responses.create(
        **_create(input="What time is it?", tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_time"})
    )
    calls = _calls(response)
    assert calls and all(call.name == "get_time" and json.loads(call.arguments) == {} for call in calls)


async def test_a_function_call_output_round_trip(client) -> None:
    first = await client.responses.create(
        **_create(input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    )
    [call] = _calls(first)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    # By previous_response_id: the stored call is found, and the answer is text (tool_choice none).
    second = await client.responses.create(
        **_create(input=[result], previous_response_id=first.id, tools=[WEATHER], tool_choice="none")
    )
    assert second.status in ("completed", "incomplete") and second.output[0].type == "message"
    alone = await client.responses.create(
        **_create(input="Weather in Oslo?", tools=[WEATHER], tool_choice="none", store=False, max_output_tokens=1)
    )
    # The call and its result are in the prompt: more than the question alone.
    assert second.usage.input_tokens > alone.usage.input_tokens + len(call.arguments) // 4
    [item] = (await client.responses.input_items.list(second.id)).data
    assert item.type == "function_call_output" and item.call_id == call.call_id
    # Without storage: the whole conversation sent back as items (the SDK's own output objects).
    third = await client.responses.create(
        **_create(
            input=[{"role": "user", "content": "Weather in Oslo?"}, call.model_dump(exclude_none=True), result],
            tools=[WEATHER],
            tool_choice="none",
            store=False,
        )
    )
    assert third.output[0].type == "message" and third.usage.input_tokens == second.usage.input_tokens


async def test_streamed_function_call_events(client) -> None:
    stream = await client.responses.create(
        **_create(input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False),
        stream=True,
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2].item.type == "function_call" and events[2].item.arguments == ""
    deltas = [event for event in events if event.type == "response.function_call_arguments.delta"]
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(event.delta for event in deltas) == done.arguments  # really streamed
    assert {event.item_id for event in deltas} == {done.item_id} == {events[2].item.id}
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    final = events[-1].response
    [call] = _calls(final)
    _check_weather(call)
    assert call.arguments == done.arguments and call.id == done.item_id
    assert "response.output_text.delta" not in kinds  # a forced call has no text


async def test_auto_on_a_template_without_tools_answers_in_the_generic_envelope(client) -> None:
    """The tiny model's template has no tool support: auto is the grammar's choice of a call or a plain answer,
    either way a well-formed response (no raw JSON leaks into the text)."""
    for _ in range(3):
        response = await client.responses.create(**_create(input="Weather in Oslo?", tools=[WEATHER]))
        if response.status != "completed":
            continue
        calls = _calls(response)
        texts = [item for item in response.output if item.type == "message"]
        assert calls or texts
        for call in calls:
            _check_weather(call)
        for text in texts:
            assert not text.content[0].text.startswith('{"response"')


async def test_a_background_response_reads_its_calls(client) -> None:
    created = await client.responses.create(
        **_create(input="Weather?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, background=True)
    )
    finished = await _wait_finished(client, created.id)
    [call] = _calls(finished)
    _check_weather(call)
    events = [event async for event in await client.responses.retrieve(created.id, stream=True)]
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments


BAD = [
    (
        {"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
        "'get_time', which is not among the tools",
    ),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "has no function_call"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "unknown item type 'reasoning'"),
    ({"input": "hi", "tools": [WEATHER, WEATHER]}, "used twice"),
    (
        {
            "input": "hi",
            "tools": [{**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}],
        },
        "tools[0].function.parameters",
    ),
]


@pytest.mark.parametrize(("fields", "words"), BAD, ids=[words for _, words in BAD])
async def test_bad_tool_input_is_a_400_in_the_openai_shape(api, fields, words) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        answer = await http.post("/v1/responses", json={"model": TINY_MODEL_NAME, **fields})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error


ANSWER = {  # an Agents SDK `output_type`: what a direct answer must be, sent with the tools on every turn
    "type": "json_schema",
    "name": "final_output",
    "schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


async def test_auto_with_an_output_schema_either_calls_or_answers_in_that_schema(client) -> None:
    """The default model's template has no tool support, so `auto` runs in the generic envelope; its direct
    answer is the client's schema. Sampled: whichever the model picks, it is a valid call or a valid answer."""
    for _ in range(4):
        response = await client.responses.create(
            **_create(
                input="Weather in Oslo?",
                tools=[WEATHER],
                tool_choice="auto",
                parallel_tool_calls=False,
                text={"format": ANSWER},
            )
        )
        assert response.status == "completed", response.output
        if calls := _calls(response):
            [call] = calls
            _check_weather(call)
        else:
            answer = json.loads(response.output_text)
            assert set(answer) == {"city"} and isinstance(answer["city"], str) and len(answer["city"]) <= 12, answer
