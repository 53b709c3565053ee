"""Tool calling with the default model, the packaged SmolLM2-135M-Instruct, whose chat template knows no tools: the
generic format, forced by grammar, makes even it answer with valid calls, and a tool-result round trip works."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from common.settings import Settings
from tests.integration.harness import ApiServer, WorkerProcess, wait_for_model
from tests.model_fixtures import seed_model_cache

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
    api: ApiServer, base_settings: Settings, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[openai.AsyncOpenAI]:
    settings = base_settings.model_copy(update={"model": SMOLLM2, "served_model_name": None})
    seed_model_cache(settings.model_cache_dir, smollm2_dir)  # the session's dequantized copy, not one of its own
    process = WorkerProcess(settings, tmp_path_factory.mktemp("smollm2") / "worker.log").start()
    await wait_for_model(api.base_url, SMOLLM2, process, timeout=300)
    yield openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=180)
    process.stop()


async def test_a_forced_call_from_the_default_model_is_valid_and_to_the_point(smollm2) -> None:
    for tools in ([WEATHER], [WEATHER, TIME]):
        reply = await smollm2.chat.completions.create(
            model=SMOLLM2,
            messages=ASK,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=100,  # it pretty-prints its JSON
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        [call] = choice.message.tool_calls
        assert call.function.name in ("get_weather", "get_time")  # which one is up to a 135M model
        if call.function.name == "get_weather":
            assert "Paris" in json.loads(call.function.arguments)["city"]


async def test_a_round_trip_with_the_default_model(smollm2) -> None:
    first = await smollm2.chat.completions.create(
        model=SMOLLM2,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=100,
    )
    message = first.choices[0].message
    [call] = message.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": "It is 18 degrees and sunny in Paris."}
    answer = await smollm2.chat.completions.create(
        model=SMOLLM2,
        messages=[*ASK, message.model_dump(exclude_none=True), result],
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=60,
    )
    choice = answer.choices[0]
    # The call and its result are rendered into the prompt (the generic JSON: 135M parrots it more than it uses it).
    assert choice.message.content and not choice.message.tool_calls, choice.message
    alone = await smollm2.chat.completions.create(model=SMOLLM2, messages=ASK, max_tokens=1)
    assert answer.usage.prompt_tokens >= alone.usage.prompt_tokens + 20
