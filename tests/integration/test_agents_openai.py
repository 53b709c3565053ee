"""An OpenAI Agents SDK agent (`openai-agents`, its OpenAIResponsesModel on an AsyncOpenAI client pointed at us)
runs its tool loop on /v1/responses against the real path (API → NATS → worker on the tiny random model): the model
is made to call the function tool, the SDK runs it and sends the function_call_output back (with the whole
conversation as input, or chained by previous_response_id), and the model answers with the agent's structured
output. Plain and streamed runs."""

from __future__ import annotations

import dataclasses
from typing import Literal

import openai
import pytest
from agents import (
    Agent,
    AgentHooks,
    ModelSettings,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from pydantic import BaseModel

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

CITIES = ("Oslo", "Paris")


class Forecast(BaseModel):
    """The agent's final output (`text.format` json_schema: a random model's answer ends once the schema is met; free
    text would run to max_output_tokens, an `incomplete` response the SDK refuses, as it would OpenAI's)."""

    sky: Literal["sunny", "rainy"]


class AnswerAfterTheTool(AgentHooks):
    """Force one call, then an answer: once its tool ran, the agent is asked for its output (a random model left to
    `auto` may call tools until the SDK's max_turns)."""

    async def on_tool_end(self, context, agent, tool, result) -> None:
        agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")


def weather_agent(client: openai.AsyncOpenAI, calls: list[str]) -> Agent:
    @function_tool
    def get_weather(city: Literal["Oslo", "Paris"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"21 degrees and sunny in {city}"

    return Agent(
        name="weather",
        instructions="You tell the weather. Use the tool.",
        model=OpenAIResponsesModel(model=TINY_MODEL_NAME, openai_client=client),
        model_settings=ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_tokens=300
        ),  # one call: a sampled random model may add calls until max_tokens
        tools=[get_weather],
        output_type=Forecast,  # sent as text.format with every turn, the forced call's too
        hooks=AnswerAfterTheTool(),
        reset_tool_choice=False,  # the hook decides the second turn's choice
    )


@pytest.fixture
async def client(api):
    async with openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.parametrize("chained", [False, True], ids=["whole-input", "previous-response-id"])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run-streamed"])
async def test_an_agent_runs_its_tool_loop_on_responses(client, chained: bool, streamed: bool) -> None:
    calls: list[str] = []
    agent = weather_agent(client, calls)
    run = {
        "starting_agent": agent,
        "input": "Weather in Oslo?",
        "max_turns": 4,
        "run_config": RunConfig(tracing_disabled=True),  # traces would go to OpenAI's servers
        "auto_previous_response_id": chained,
    }
    if streamed:
        result = Runner.run_streamed(**run)
        events = [event async for event in result.stream_events()]
        assert any(event.type == "raw_response_event" for event in events)
    else:
        result = await Runner.run(**run)

    assert len(calls) == 1 and calls[0] in CITIES, calls  # the SDK ran the tool once, with valid arguments
    assert [type(item) for item in result.new_items] == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    assert isinstance(result.final_output, Forecast)
    first, second = [await client.responses.retrieve(r.response_id) for r in result.raw_responses]
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and first.status == "completed"
    # The function's output went back with the second request: after the stored call (chained) or with it.
    sent = (await client.responses.input_items.list(second.id, order="asc")).data
    outputs = [item for item in sent if item.type == "function_call_output"]
    assert [(o.call_id, o.output) for o in outputs] == [(call.call_id, f"21 degrees and sunny in {calls[0]}")]
    assert second.previous_response_id == (first.id if chained else None)
    assert any(item.type == "function_call" for item in sent) is not chained
    assert [item.type for item in second.output] == ["message"] and second.tool_choice == "none"
    assert Forecast.model_validate_json(second.output_text) == result.final_output
