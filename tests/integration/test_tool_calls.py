"""Tool calling on chat completions end to end with the real openai SDK: API → JetStream → worker → masked sampling
→ the answer read at the edge. The tiny random model has never seen a tool, so every valid call from it is the
grammar's doing (generic format, the SmolLM2 template); a second worker serves the same weights under a chat
template with Hermes tool calling, whose answers are read in that format."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess, wait_for_model
from tests.integration.test_batches import read_lines, start_batch, wait_final
from tests.model_fixtures import TINY_MODEL_NAME
from tests.tool_templates import HERMES_TEMPLATE

pytestmark = pytest.mark.asyncio

HERMES_MODEL = "tiny-hermes"
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY_SCHEMA, "strict": True},
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
# A client grammar that makes the random model write the Hermes format (tool_choice auto reads the model's own
# format, and a client constraint may shape that answer).
HERMES_TWO_CALLS = {
    "regex": "Sure\\.\n"
    + (HERMES_CALL + "\n").replace("{", "\\{").replace("}", "\\}").replace(".", "\\.")
    + '<tool_call>\n\\{"name": "get_time", "arguments": \\{\\}\\}\n</tool_call>'
}


class Weather(BaseModel):
    city: str = Field(max_length=12)
    unit: str = Field(pattern="^[cf]$")


@pytest.fixture(scope="session")
def client(api: ApiServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
async def hermes_worker(
    api: ApiServer, base_settings: Settings, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WorkerProcess]:
    model_dir = tmp_path_factory.mktemp("tiny-hermes")
    shutil.copytree(tiny_model_dir, model_dir, dirs_exist_ok=True)
    (model_dir / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    settings = base_settings.model_copy(update={"model": str(model_dir), "served_model_name": HERMES_MODEL})
    process = WorkerProcess(settings, tmp_path_factory.mktemp("hermes") / "worker.log").start()
    await wait_for_model(api.base_url, HERMES_MODEL, process)
    yield process
    process.stop()


def _arguments(call) -> dict:
    return json.loads(call.function.arguments)


async def test_required_forces_a_valid_call_for_every_seed(client) -> None:
    for seed in range(4):
        reply = await client.chat.completions.create(
            model=TINY_MODEL_NAME,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and choice.message.content is None
        if call.function.name == "get_weather":
            Weather.model_validate(_arguments(call))
            assert set(_arguments(call)) == {"city", "unit"}
        else:
            assert call.function.name == "get_time" and _arguments(call) == {}


async def test_a_named_choice_calls_that_function(client) -> None:
    for seed in range(3):
        reply = await client.chat.completions.create(
            model=TINY_MODEL_NAME,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        calls = reply.choices[0].message.tool_calls
        assert calls and all(call.function.name == "get_weather" for call in calls)
        assert all(set(_arguments(call)) == {"city", "unit"} for call in calls)


async def test_auto_answers_either_text_or_calls_and_none_never_calls(client) -> None:
    kinds = set()
    for seed in range(5):
        reply = await client.chat.completions.create(
            model=TINY_MODEL_NAME, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60
        )
        choice = reply.choices[0]
        if choice.message.tool_calls:
            kinds.add("calls")
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            kinds.add("text")
            # the generic envelope's text is the decoded `response` string, never the JSON around it
            assert not (choice.message.content or "").lstrip().startswith('{"response"')
    assert kinds  # (which of the two a random model picks is up to it)
    none = await client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none", temperature=1.0, seed=1, max_tokens=20
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


async def _streamed(client, **request) -> tuple[str, list[dict], str | None, list]:
    content, calls, finish, entries = "", [], None, []
    async for chunk in await client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for entry in choice.delta.tool_calls or []:
                entries.append(entry)
                if entry.id is not None:  # the first delta of a call: index, id, type, name
                    assert entry.index == len(calls) and entry.type == "function" and entry.function.name
                    calls.append({"id": entry.id, "name": entry.function.name, "arguments": ""})
                else:
                    assert entry.function.name is None and entry.type is None
                calls[entry.index]["arguments"] += entry.function.arguments or ""
    return content, calls, finish, entries


# One greedy forced call, short enough to finish (the envelope's whitespace is bounded per gap).
GREEDY_CALL = {
    "model": TINY_MODEL_NAME,
    "messages": ASK,
    "tools": TOOLS,
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "temperature": 0.0,
    "max_tokens": 300,
}


async def test_streamed_call_deltas_reassemble_to_the_non_streamed_calls(client) -> None:
    request = GREEDY_CALL
    whole = (await client.chat.completions.create(**request)).choices[0]
    content, calls, finish, entries = await _streamed(client, **request)
    assert finish == whole.finish_reason == "tool_calls" and content == "", whole.message
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert len(entries) > len(calls)  # arguments really arrived in fragments


async def test_a_tool_result_round_trip(client) -> None:
    first = await client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required", seed=3, max_tokens=120
    )
    message = first.choices[0].message
    results = [{"role": "tool", "tool_call_id": call.id, "content": "4 degrees, rain"} for call in message.tool_calls]
    follow_up = [*ASK, message.model_dump(exclude_none=True), *results]
    answer = await client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=follow_up, tools=TOOLS, tool_choice="none", seed=3, max_tokens=12
    )
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    auto = await client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=follow_up, tools=TOOLS, temperature=1.0, seed=3, max_tokens=60
    )
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls
    # The round trip renders the call and its result into the prompt.
    alone = await client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    assert answer.usage.prompt_tokens >= alone.usage.prompt_tokens + 20


async def test_parallel_tool_calls_allow_several_and_false_at_most_one(client, smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)  # the tiny model's tokenizer
    comma = tokenizer.convert_tokens_to_ids(",")
    # A strong bias for ',' makes the model continue the call list whenever the grammar lets it.
    request = {
        "model": TINY_MODEL_NAME,
        "messages": ASK,
        "tools": [TIME],
        "tool_choice": "required",
        "logit_bias": {str(comma): 100},
        "max_tokens": 60,
        "temperature": 0,  # unseeded sampling could spend the 60 tokens on the whitespace JSON allows
    }
    several = (await client.chat.completions.create(parallel_tool_calls=True, **request)).choices[0]
    assert len(several.message.tool_calls) >= 2
    assert all(call.function.name == "get_time" for call in several.message.tool_calls)
    one = (await client.chat.completions.create(parallel_tool_calls=False, **request)).choices[0]
    assert len(one.message.tool_calls) == 1 and one.finish_reason == "tool_calls"


async def test_parse_with_a_pydantic_function_tool(client) -> None:
    for seed in range(4):
        completion = await client.chat.completions.parse(
            model=TINY_MODEL_NAME,
            messages=ASK,
            tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        [call] = completion.choices[0].message.tool_calls
        assert isinstance(call.function.parsed_arguments, Weather)


async def test_a_model_s_own_format_is_read_from_its_text(client, hermes_worker) -> None:
    request = {
        "model": HERMES_MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "max_tokens": 90,  # the tiny model's context is 512 tokens, the template's tool listing ~400 of them
        "extra_body": {"structured_outputs": HERMES_TWO_CALLS},
    }
    whole = (await client.chat.completions.create(**request)).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure."
    assert [(c.function.name, _arguments(c)) for c in whole.message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}),
        ("get_time", {}),
    ]
    content, calls, finish, _ = await _streamed(client, **request)
    assert (content.strip(), finish) == ("Sure.", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    one = await client.chat.completions.create(parallel_tool_calls=False, **request)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    # Forced choices use the grammar's envelope on this model too.
    forced = await client.chat.completions.create(
        model=HERMES_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=90,
        seed=1,
        temperature=1.0,
    )
    assert forced.choices[0].finish_reason == "tool_calls" and forced.choices[0].message.tool_calls
    # A round trip renders through the template's own tool format.
    call = whole.message.tool_calls[0]
    answer = await client.chat.completions.create(
        model=HERMES_MODEL,
        messages=[
            *ASK,
            whole.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "rain"},
        ],
        tools=TOOLS,
        max_tokens=8,
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


BAD = {
    "unknown tool in tool_choice": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
        "'launch', which is not among the tools",
    ),
    "tool_choice without tools": ({"tool_choice": "required"}, "tool_choice needs tools"),
    "tool message without a matching call": (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "4 degrees"}]},
        "tool_call_id 'call_x' answers no call",
    ),
    "invalid parameter schema": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
        "tools[0].function.parameters: the JSON schema is invalid",
    ),
    "schema over the size limit": (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(800)},
                        },
                    },
                }
            ]
        },
        "over the limit",
    ),
    "auto in the generic envelope and a regex": (
        {"tools": TOOLS, "tool_choice": "auto", "extra_body": {"structured_outputs": {"regex": "a+"}}},
        "structured_outputs cannot be combined with tool_choice auto",
    ),
}


@pytest.mark.parametrize(("fields", "message"), BAD.values(), ids=BAD.keys())
async def test_bad_tool_input_is_a_400_naming_the_problem(client, fields, message) -> None:
    body = {"model": TINY_MODEL_NAME, "messages": ASK, "max_tokens": 5, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**body)
    error = caught.value.body
    assert message in error["message"], error
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"


async def test_tools_on_completions_are_refused(client) -> None:
    with pytest.raises(openai.BadRequestError, match="tools"):
        await client.completions.create(model=TINY_MODEL_NAME, prompt="x", max_tokens=2, extra_body={"tools": TOOLS})


async def _sse_events(http, body: dict, headers: dict) -> list[tuple[str, dict]]:
    events, event_id = [], None
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("data: {"):
                events.append((event_id, json.loads(line.removeprefix("data: "))))
    return events


async def test_a_resumed_stream_repeats_the_call_deltas_and_ids(api) -> None:
    body = {**GREEDY_CALL, "stream": True}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=120) as http:
        first = await _sse_events(http, body, {})
        assert any(chunk["choices"] and chunk["choices"][0]["delta"].get("tool_calls") for _, chunk in first)
        resume_after = 3
        resumed = await _sse_events(http, body, {"Last-Event-ID": first[resume_after][0]})
    # Replayed from the token journal and read again at the edge: the same chunks, call ids included.
    assert any("id" in call for _, chunk in resumed for call in chunk["choices"][0]["delta"].get("tool_calls", []))
    assert [(event_id, chunk["choices"]) for event_id, chunk in resumed] == [
        (event_id, chunk["choices"]) for event_id, chunk in first[resume_after + 1 :]
    ]


async def test_a_batch_line_with_tools_gets_its_calls(client) -> None:
    body = {**GREEDY_CALL, "tools": [TIME]}
    batch = await start_batch(
        client,
        [{"custom_id": "tool-1", "method": "POST", "url": "/v1/chat/completions", "body": body}],
        endpoint="/v1/chat/completions",
    )
    done = await wait_final(client, batch.id)
    [line] = await read_lines(client, done.output_file_id)
    choice = line["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [call["function"]["name"] for call in choice["message"]["tool_calls"]] == ["get_time"]
