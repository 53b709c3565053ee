"""The stream events of an answer with text and a call, in a model's own format (Hermes, as Qwen2.5 writes it):
the tiny test model's template has no tool support, so the integration tests only see the generic envelope (calls
alone, or text alone). Here a fake generation streams `Sure.<tool_call>…</tool_call>` in small pieces through the
Responses events and the Messages blocks: the text item/block opens first, the call's after it, the fragments
reassemble, and the non-streamed message equals the streamed one."""

from __future__ import annotations

import json

import pytest

from api.serving.messages import _Reply
from api.serving.response_events import ResponseEvents, new_response
from api.tools.definitions import FunctionTool
from api.tools.plan import plan_tools
from contracts import ChoiceDelta, End, Tokens, Usage
from contracts.events import FinishReason
from tests.tool_templates import HERMES_TEMPLATE

pytestmark = pytest.mark.asyncio
ANSWER = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
WEATHER = FunctionTool.model_validate(
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
)


class FakeGeneration:
    """The events a worker would send for ANSWER, four characters at a time."""

    def __init__(self, text: str = ANSWER):
        self.text = text

    async def __aiter__(self):
        pieces = [self.text[i : i + 4] for i in range(0, len(self.text), 4)]
        for seq, piece in enumerate(pieces, start=1):
            last = seq == len(pieces)
            yield Tokens(
                request_id="r",
                seq=seq,
                choices=[ChoiceDelta(text=piece, finish_reason=FinishReason.STOP if last else None)],
            )
        yield End(request_id="r", seq=len(pieces) + 1, usage=Usage(prompt_tokens=3, completion_tokens=len(pieces)))


def _plan():
    plan = plan_tools([WEATHER], "auto", chat_template=HERMES_TEMPLATE)
    assert plan.answer_format is not None and plan.constraint is None  # read in the model's own format, unforced
    return plan


async def test_responses_events_open_the_message_then_the_call() -> None:
    builder = ResponseEvents(new_response("resp_" + "a" * 32, "m", {}, status="queued"))
    events = [event async for event in builder.run(FakeGeneration(), _plan().stream("resp-1"))]
    kinds = [event["type"] for event in events]
    assert kinds[:3] == ["response.in_progress", "response.output_item.added", "response.content_part.added"]
    added = [event for event in events if event["type"] == "response.output_item.added"]
    assert [(event["output_index"], event["item"]["type"]) for event in added] == [(0, "message"), (1, "function_call")]
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    arguments = "".join(event["delta"] for event in events if event["type"] == "response.function_call_arguments.delta")
    assert text == "Sure." and json.loads(arguments) == {"city": "Oslo"}
    assert kinds[-6:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    message, call = events[-1]["response"]["output"]
    assert message["content"][0]["text"] == "Sure." and message["status"] == "completed"
    assert call["name"] == "get_weather" and call["arguments"] == arguments and call["status"] == "completed"
    assert call["id"] == "fc_" + call["call_id"].removeprefix("call_")
    # The same answer read again (a runner taking a background response over) makes the same events.
    again = ResponseEvents(new_response("resp_" + "a" * 32, "m", {}, status="queued"))
    replayed = [event async for event in again.run(FakeGeneration(), _plan().stream("resp-1"))]
    assert [event for event in replayed if "response" not in event] == [e for e in events if "response" not in e]


async def test_a_plain_answer_opens_its_message_before_the_first_token() -> None:
    builder = ResponseEvents(new_response("resp_" + "b" * 32, "m", {}, status="queued"))
    events = [event async for event in builder.run(FakeGeneration("Hello there"))]
    assert [event["type"] for event in events[:4]] == [
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello there"


async def test_messages_blocks_text_then_tool_use_and_the_same_message_unstreamed() -> None:
    reply = _Reply("msg_1", "m", 3, _plan(), "msg-1")
    events = [event async for event in reply.events(FakeGeneration())]
    starts = [event for event in events if event["type"] == "content_block_start"]
    assert [(event["index"], event["content_block"]["type"]) for event in starts] == [(0, "text"), (1, "tool_use")]
    stops = [event["index"] for event in events if event["type"] == "content_block_stop"]
    assert stops == [0, 1]  # the text block is closed before the tool_use block opens
    assert events.index(next(e for e in events if e["type"] == "content_block_stop")) < events.index(starts[1])
    fragments = [e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta"]
    assert [event["delta"]["stop_reason"] for event in events if event["type"] == "message_delta"] == ["tool_use"]
    collected = await _Reply("msg_1", "m", 3, _plan(), "msg-1").collect(FakeGeneration())
    text, tool_use = collected["content"]
    assert text == {"type": "text", "text": "Sure."} and collected["stop_reason"] == "tool_use"
    assert tool_use["input"] == json.loads("".join(fragments)) == {"city": "Oslo"}
    assert tool_use["id"] == starts[1]["content_block"]["id"] and tool_use["id"].startswith("toolu_")
