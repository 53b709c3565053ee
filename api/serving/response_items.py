"""Items of the Responses API: the client's `input` checked and normalised into stored items, and a
conversation of items turned into chat messages for the model's template.

An item is a dict in the Responses shape: `message` (role + text parts), `function_call` (a call the model made)
and `function_call_output` (its result; an output needs its call). For the template they become chat messages:
an assistant message with `tool_calls` (consecutive calls, and the assistant text before them, are one turn) and
`tool` messages, which the tool plan (api/tools/plan.py) renders in the model's own terms."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from api.errors import ApiError
from api.schemas.openai import ChatMessage
from api.tools.definitions import CalledFunction, MessageToolCall
from contracts import ErrorCode

Item = dict[str, Any]

INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
TOOL_ITEMS = ("function_call", "function_call_output")


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, message, param=param)


def normalise_input(given: str | list[Item], earlier: Sequence[Item]) -> list[Item]:
    """The request's `input` as stored items (each with an id). `earlier` is the conversation before it
    (from `previous_response_id`), where a function_call_output may find its call."""
    if isinstance(given, str):
        return [_message("user", [{"type": "input_text", "text": given}])]
    items: list[Item] = []
    for index, raw in enumerate(given):
        param = f"input[{index}]"
        kind = raw.get("type", "message" if "role" in raw else None)
        if kind == "message":
            items.append(_input_message(raw, param))
        elif kind in TOOL_ITEMS:
            items.append(_tool_item(raw, kind, param, [*earlier, *items]))
        else:
            raise _invalid(
                f"{param}: unknown item type {kind!r} (supported: message, function_call, function_call_output)",
                f"{param}.type",
            )
    return items


def _message(role: str, content: list[Item], message_id: str | None = None) -> Item:
    return {
        "type": "message",
        "id": message_id or item_id("msg"),
        "role": role,
        "content": content,
        "status": "completed",
    }


def _input_message(raw: Item, param: str) -> Item:
    role = raw.get("role")
    if role not in INPUT_ROLES:
        raise _invalid(f"{param}.role: must be one of {', '.join(INPUT_ROLES)}", f"{param}.role")
    content = raw.get("content")
    part_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return _message(role, [{"type": part_type, "text": content}], raw.get("id"))
    if not isinstance(content, list) or not content:
        raise _invalid(f"{param}.content: a string or a non-empty list of text parts", f"{param}.content")
    parts = []
    for position, part in enumerate(content):
        where = f"{param}.content[{position}]"
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _invalid(
                f"{where}: content part {kind!r} is not supported (only input_text and output_text with a text)", where
            )
        parts.append({"type": part["type"], "text": part["text"]})
    return _message(role, parts, raw.get("id"))


def _tool_item(raw: Item, kind: str, param: str, before: Sequence[Item]) -> Item:
    call_id = raw.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{param}.call_id: required for a {kind} item", f"{param}.call_id")
    if kind == "function_call_output":
        if not any(item.get("type") == "function_call" and item.get("call_id") == call_id for item in before):
            raise _invalid(
                f"{param}: function_call_output for call_id {call_id!r} has no function_call before it "
                "(in this input or the previous response)",
                f"{param}.call_id",
            )
        if not isinstance(raw.get("output"), str):
            raise _invalid(f"{param}.output: a string", f"{param}.output")
        return {
            "type": kind,
            "id": raw.get("id") or item_id("fco"),
            "call_id": call_id,
            "output": raw["output"],
            "status": "completed",
        }
    if not isinstance(raw.get("name"), str) or not isinstance(raw.get("arguments"), str):
        raise _invalid(f"{param}: a function_call needs a name and arguments (a JSON string)", param)
    return {
        "type": kind,
        "id": raw.get("id") or item_id("fc"),
        "call_id": call_id,
        "name": raw["name"],
        "arguments": raw["arguments"],
        "status": "completed",
    }


def chat_messages(instructions: str | None, conversation: Sequence[Item]) -> list[ChatMessage]:
    """What the chat template renders: the instructions as the system message, then each item (a developer
    message is a system message to the template; function calls join the assistant turn they belong to)."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    for item in conversation:
        if item["type"] == "function_call":
            call = MessageToolCall(
                id=item["call_id"], function=CalledFunction(name=item["name"], arguments=item["arguments"])
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif item["type"] == "function_call_output":
            messages.append(ChatMessage(role="tool", tool_call_id=item["call_id"], content=item["output"]))
        else:
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append(ChatMessage(role=role, content="".join(part["text"] for part in item["content"])))
    return messages
