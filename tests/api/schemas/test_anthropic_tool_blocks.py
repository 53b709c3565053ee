"""Anthropic tool blocks read into chat's terms: an assistant turn is one message with its text and calls (input
as JSON text), a user turn's tool_result blocks are `tool` messages in place, text around them user messages;
tool_choice maps to chat's (any → required, tool → a named function)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api.schemas.anthropic import MessagesInput

CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}


def _input(**fields) -> MessagesInput:
    return MessagesInput.model_validate({"model": "m", **fields})


def test_a_tool_round_trip_becomes_chat_messages() -> None:
    body = _input(
        system="Be brief.",
        tools=[TOOL],
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, CALL]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "rain"}]},
                    {"type": "text", "text": "And "},
                    {"type": "text", "text": "tomorrow?"},
                ],
            },
        ],
    )
    roles = [(message.role, message.text()) for message in body.chat_messages()]
    assert roles == [
        ("system", "Be brief."),
        ("user", "Weather?"),
        ("assistant", "Looking."),
        ("tool", "rain"),
        ("user", "And tomorrow?"),
    ]
    [call] = body.chat_messages()[2].tool_calls
    assert call.id == "toolu_1" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert body.chat_messages()[3].tool_call_id == "toolu_1"
    [tool] = body.function_tools
    assert tool.function.parameters == {"type": "object"}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "any"}, "required"), ({"type": "auto"}, "auto"), ({"type": "none"}, "none")],
)
def test_tool_choices_map_to_chats(choice, expected) -> None:
    body = _input(tools=[TOOL], tool_choice=choice, messages=[{"role": "user", "content": "hi"}])
    assert body.function_tool_choice == expected and body.parallel_tool_calls


def test_a_named_choice_and_disabled_parallel_use() -> None:
    body = _input(
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert body.function_tool_choice.function.name == "get_weather" and not body.parallel_tool_calls


def test_an_error_result_says_so() -> None:
    body = _input(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [CALL]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "boom"}],
            },
        ]
    )
    assert body.chat_messages()[-1].text() == "Error: boom"


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}], "no tool_use block"),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [CALL]},
                {"role": "user", "content": "no result"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
            ],
            "no tool_use block",  # only the assistant message just before counts
        ),
        ([{"role": "user", "content": [CALL]}], "user messages cannot hold tool_use blocks"),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}],
                }
            ],
            "image content is not supported",
        ),
    ],
)
def test_misplaced_tool_blocks_are_refused(messages, words) -> None:
    with pytest.raises(ValidationError, match=words):
        _input(messages=messages)
