"""Tool calling with the default model, the packaged SmolLM2-135M-Instruct, whose chat template knows no tools: the
generic format, forced by grammar, makes even it answer with valid calls, and a tool-result round trip works."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import pytest

from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess, wait_for_model

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

SMOLLM2 = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the current time"}}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="session")
async def smollm2(
    api: ApiServer, base_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[openai.AsyncOpenAI]:
    settings = base_settings.model_copy(update={"model": SMOLLM2, "served_model_name": None})
    process = WorkerProcess(settings, tmp_path_factory.mktemp("smollm2") / "worker.log").start()
    await wait_for_model(api.base_url, SMOLLM2, process, timeout=600)  # the first start dequantizes the GGUF
    yield openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=180)
    process.stop()


async def test_a_forced_call_from_the_default_model_is_valid_and_to_the_point(smollm2) -> None:
    reply = await smollm2.chat.completions.create(
        model=SMOLLM2, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=60
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert "Paris" in json.loads(call.function.arguments)["city"]


async def test_a_round_trip_with_the_default_model(smollm2) -> None:
    first = await smollm2.chat.completions.create(
        model=SMOLLM2,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    message = first.choices[0].message
    [call] = message.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": "It is 18 degrees and sunny in Paris."}
    answer = await smollm2.chat.completions.create(
        model=SMOLLM2,
        messages=[*ASK, message.model_dump(exclude_none=True), result],
        tools=[WEATHER],
        temperature=0,
        max_tokens=60,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice.message
    assert "18" in choice.message.content or "sunny" in choice.message.content.lower()
