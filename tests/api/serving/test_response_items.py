"""Responses API input items: normalised into stored items, checked with clear 400s, rendered as chat messages;
and the request envelope refusing what needs structured output."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.errors import ApiError
from api.schemas.responses import ResponseRequest
from api.serving.response_items import chat_messages, normalise_input
from contracts.constraints import JsonSchemaConstraint


def test_a_string_is_one_user_message() -> None:
    [item] = normalise_input("hi", [])
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "hi"}]


def test_messages_keep_roles_and_parts_and_render_in_order() -> None:
    items = normalise_input(
        [
            {"role": "developer", "content": "Be brief."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
            {"role": "assistant", "content": "c", "id": "msg_given"},
        ],
        [],
    )
    assert [item["role"] for item in items] == ["developer", "user", "assistant"]
    assert items[2]["id"] == "msg_given" and items[2]["content"][0]["type"] == "output_text"
    messages = chat_messages("Rules.", items)
    assert [(m.role, m.text()) for m in messages] == [
        ("system", "Rules."),
        ("system", "Be brief."),
        ("user", "ab"),
        ("assistant", "c"),
    ]


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ([{"type": "reasoning", "id": "r"}], "unknown item type 'reasoning'"),
        ([{"foo": 1}], "unknown item type None"),
        ([{"role": "tool", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": []}], "input[0].content"),
        ([{"role": "user", "content": [{"type": "input_image"}]}], "'input_image' is not supported"),
        ([{"type": "function_call_output", "call_id": "c9", "output": "1"}], "has no function_call before it"),
        ([{"type": "function_call", "call_id": "c1"}], "needs a name and arguments"),
    ],
)
def test_bad_items_are_400s_naming_the_item(given, words) -> None:
    with pytest.raises(ApiError) as caught:
        normalise_input(given, [])
    assert caught.value.status == 400 and words in caught.value.info.message


def test_a_function_call_output_finds_its_call_in_earlier_turns_and_becomes_a_tool_message() -> None:
    earlier = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
        {"type": "function_call", "id": "fc_2", "call_id": "c2", "name": "g", "arguments": "{}"},
    ]
    outputs = normalise_input(
        [
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "function_call_output", "call_id": "c2", "output": "43"},
        ],
        earlier,
    )
    assert [output["output"] for output in outputs] == ["42", "43"]
    messages = chat_messages(None, [*earlier, *outputs])
    # The assistant's text and both calls are one turn; each output answers its call.
    assert [message.role for message in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1].text() == "Let me look."
    assert [(call.id, call.function.name, call.function.arguments) for call in messages[1].tool_calls] == [
        ("c1", "f", '{"x": 1}'),
        ("c2", "g", "{}"),
    ]
    assert [(message.tool_call_id, message.text()) for message in messages[2:]] == [("c1", "42"), ("c2", "43")]


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [{"type": "web_search_preview"}]},
        {"tools": [{"type": "function", "name": "f", "parameters": {}, "bogus": 1}]},
        {"tools": [{"type": "function", "name": "f"}], "tool_choice": "sometimes"},
        {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search_preview"}},
        {"background": True, "store": False},
        {"text": {"format": {"type": "json_schema", "name": "x"}}},
        {"text": {"format": {"type": "yaml"}}},
    ],
)
def test_requests_needing_what_is_not_there_are_refused(fields) -> None:
    with pytest.raises(ValidationError):
        ResponseRequest(model="m", input="hi", **fields)


def test_text_format_is_read_into_the_same_constraint_as_chat_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    flat = ResponseRequest(
        model="m", input="hi", text={"format": {"type": "json_schema", "name": "x", "schema": schema, "strict": True}}
    )
    assert flat.constraint == JsonSchemaConstraint(json_schema=schema, strict=True)
    assert flat.echoed()["text"]["format"]["schema"] == schema and flat.echoed()["text"]["format"]["name"] == "x"
    assert ResponseRequest(model="m", input="hi", text={"format": {"type": "json_object"}}).constraint.type == (
        "json_object"
    )
    assert ResponseRequest(model="m", input="hi", text={"format": {"type": "text"}}).constraint is None


def test_flat_function_tools_and_choices_are_read_as_chats() -> None:
    body = ResponseRequest(
        model="m",
        input="hi",
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "f"},
        parallel_tool_calls=False,
    )
    [tool] = body.function_tools
    assert tool.function.name == "f" and tool.function.parameters == {"type": "object"} and tool.function.strict
    assert body.function_tool_choice.function.name == "f"
    assert (
        body.echoed()["tool_choice"] == {"type": "function", "name": "f"} and not body.echoed()["parallel_tool_calls"]
    )
    # auto with an empty tool list (as agent frameworks send it) asks for nothing.
    assert ResponseRequest(model="m", input="hi", tools=[], tool_choice="auto").function_tool_choice is None


def test_tools_with_tool_choice_none_and_a_text_format_are_fine() -> None:
    body = ResponseRequest(
        model="m",
        input="hi",
        tools=[{"type": "function", "name": "f"}],
        tool_choice="none",
        text={"format": {"type": "text"}},
        max_output_tokens=5,
        temperature=0,
    )
    assert body.sampling().max_tokens == 5 and body.echoed()["tool_choice"] == "none"
