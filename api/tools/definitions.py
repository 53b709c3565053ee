"""OpenAI function tools and `tool_choice`, and the constraint that forces a call.

`required` and a named function are forced by a JSON schema in the generic envelope (api/tools/formats.py,
`generic`), so even a model that has never seen a tool produces a valid call: one call `{"tool_call": {"name",
"arguments"}}`, or with parallel calls allowed `{"tool_calls": [...]}` (at least one). `auto` on a template
without tool support uses the same envelope with a third way out, `{"response": "..."}` (llama.cpp's generic
format). `auto` on a template with its own tool format and `none` are not constrained.

Each call's `arguments` follows its function's `parameters` schema. A function marked `strict` makes the whole
constraint strict: a schema keyword the engine cannot enforce is then a 400 rather than ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.tools.formats import ToolFormat
from contracts.constraints import JsonSchemaConstraint

# OpenAI: a function without `parameters` takes no arguments.
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(BaseModel):
    """A call in an assistant message of the conversation (OpenAI `messages[].tool_calls[]`)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Annotated[Literal["none", "auto", "required"] | NamedToolChoice, Field(union_mode="left_to_right")]


class ToolChoiceError(ValueError):
    """tool_choice names a function that is not among the tools, or asks for a call without tools."""


def _call_schema(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or EMPTY_PARAMETERS,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _envelope(
    calls: dict[str, Any], *, parallel: bool, allow_response: bool, response_schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`response_schema`: what a direct answer must be (the client's output schema); a string when None."""
    key, value = ("tool_calls", {"type": "array", "items": calls, "minItems": 1}) if parallel else ("tool_call", calls)
    options = [{"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}]
    if allow_response:
        options.append(
            {
                "type": "object",
                "properties": {"response": response_schema if response_schema is not None else {"type": "string"}},
                "required": ["response"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def selected_tools(tools: list[FunctionTool], tool_choice: ToolChoice) -> list[FunctionTool]:
    """The tools a call may use under `tool_choice` (a named choice narrows them to one)."""
    if isinstance(tool_choice, NamedToolChoice):
        chosen = [tool for tool in tools if tool.function.name == tool_choice.function.name]
        if not chosen:
            names = ", ".join(tool.function.name for tool in tools) or "none"
            raise ToolChoiceError(
                f"tool_choice names the function {tool_choice.function.name!r}, which is not among the tools ({names})"
            )
        return chosen
    return tools


def call_constraint(
    tools: list[FunctionTool],
    tool_choice: ToolChoice,
    *,
    parallel_tool_calls: bool = True,
    tool_format: ToolFormat = ToolFormat.GENERIC,
    response_schema: dict[str, Any] | None = None,
) -> JsonSchemaConstraint | None:
    """The constraint for a request with tools, or None when the model answers freely (`none`, or `auto` with a
    template that has its own tool format, parsed at the edge). `response_schema`: the JSON schema a direct answer
    (`auto` in the generic envelope) must match, from the client's output format."""
    if tool_choice == "none":
        return None
    if not tools:
        raise ToolChoiceError("tool_choice requires tools")
    forced = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    if not forced and tool_format is not ToolFormat.GENERIC:
        return None
    chosen = selected_tools(tools, tool_choice)
    calls = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(tool) for tool in chosen]}
    definitions: dict[str, Any] = {}
    if response_schema is not None:  # its references point at the document's root: move its `$defs` there
        response_schema = dict(response_schema)
        definitions = {key: response_schema.pop(key) for key in ("$defs", "definitions") if key in response_schema}
    schema = _envelope(calls, parallel=parallel_tool_calls, allow_response=not forced, response_schema=response_schema)
    return JsonSchemaConstraint(
        json_schema={**schema, **definitions}, strict=any(tool.function.strict for tool in chosen)
    )


def generic_tools_prompt(
    tools: list[FunctionTool],
    tool_choice: ToolChoice,
    *,
    parallel_tool_calls: bool = True,
    json_answer: bool = False,
) -> str:
    """A system-prompt text that tells a model without native tool support about the tools and the JSON it must
    answer with (the grammar enforces the shape; this helps it choose well and fill the arguments).
    `json_answer`: a direct answer is JSON in the client's output format, not a string."""
    chosen = selected_tools(tools, tool_choice)
    listing = json.dumps([tool.function.model_dump(exclude_none=True) for tool in chosen], indent=2)
    call = '{"name": "<function name>", "arguments": {...}}'
    calls = (
        f'{{"tool_calls": [{call}, ...]}} (one or more calls)' if parallel_tool_calls else f'{{"tool_call": {call}}}'
    )
    forced = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    answer = (
        f"Respond with a JSON object that calls a tool: {calls}."
        if forced
        else f"Respond with a JSON object, either calling a tool: {calls}, or answering directly: "
        + (
            '{"response": <your answer as JSON in the requested format>}.'
            if json_answer
            else '{"response": "<your answer>"}.'
        )
    )
    return f"You can call these tools:\n{listing}\n{answer}"
