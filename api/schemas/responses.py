"""The Responses API request (`POST /v1/responses`). Items of `input` are checked one by one in
api/serving/response_items.py (clear messages per item); here the envelope: `text.format` read into the same wire
constraint as chat's `response_format` (its shape here; whether it compiles: api/structured.py), and the flat
Responses function tools and `tool_choice` read into chat's (api/tools/definitions.py), which the tool plan
(api/tools/plan.py) takes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from api.schemas.structured import ResponseFormat
from api.tools.definitions import FunctionDefinition, FunctionTool, NamedFunction, NamedToolChoice, ToolChoice
from contracts import SamplingParams
from contracts.constraints import Constraint, parse_constraint

TOOL_CHOICES = ("none", "auto", "required")


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # verbosity: accepted, no effect
    format: dict[str, Any] | None = None


def text_format_constraint(text_format: dict[str, Any]) -> Constraint | None:
    """The Responses `text.format` (flat: `{"type": "json_schema", "name", "schema", "strict", "description"}`)
    as a wire constraint, read as chat's nested `response_format` so that both fields mean the same."""
    kind = text_format.get("type", "text")
    rest = {key: value for key, value in text_format.items() if key != "type"}
    nested = {"type": kind, "json_schema": rest} if kind == "json_schema" else {"type": kind, **rest}
    try:
        wanted = ResponseFormat.model_validate(nested).constraint()
        return parse_constraint(wanted) if wanted is not None else None
    except ValidationError as exc:
        error = exc.errors()[0]
        # Locations are in the nested terms (json_schema.schema, or the constraint's json_schema): name the flat
        # field the client sent.
        field = ".".join(["text.format", *(str(part) for part in error["loc"] if part != "json_schema")])
        raise ValueError(f"{field}: {error['msg'].removeprefix('Value error, ')}") from None


def read_function_tools(tools: list[dict[str, Any]]) -> list[FunctionTool]:
    """Responses function tools (flat: `{"type": "function", "name", "description", "parameters", "strict"}`)
    as chat's nested ones. Hosted tools (web search, file search, computer use, ...) do not exist here."""
    converted = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise ValueError(f"tools[{index}]: tool type {kind!r} is not supported here (only function tools)")
        try:
            definition = FunctionDefinition.model_validate({key: value for key, value in tool.items() if key != "type"})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"tools[{index}].{where}: {error['msg']}") from None
        converted.append(FunctionTool(function=definition))
    return converted


def read_tool_choice(tool_choice: str | dict[str, Any]) -> ToolChoice:
    """`none`, `auto`, `required`, or `{"type": "function", "name": ...}` (Responses' flat named choice)."""
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice: {tool_choice!r} is not one of {', '.join(TOOL_CHOICES)}")
        return tool_choice  # type: ignore[return-value]
    if tool_choice.get("type") != "function" or not isinstance(tool_choice.get("name"), str):
        raise ValueError(
            'tool_choice: a named choice is {"type": "function", "name": ...} (hosted tools and allowed_tools '
            "are not supported here)"
        )
    return NamedToolChoice(function=NamedFunction(name=tool_choice["name"]))


class ResponseRequest(BaseModel):
    # SDKs send fields newer than this model; they are accepted and ignored unless they change generation.
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    background: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    user: str | None = None
    # Routing hints (docs/routing.md): requests with the same key (of the same caller) go to the same worker.
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    safety_identifier: str | None = Field(default=None, max_length=1024)
    _constraint: Constraint | None = PrivateAttr(default=None)
    _function_tools: list[FunctionTool] = PrivateAttr(default_factory=list)
    _tool_choice: ToolChoice | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_tools_and_format(self):
        self._function_tools = read_function_tools(self.tools or [])
        self._tool_choice = read_tool_choice(self.tool_choice) if self.tool_choice is not None else None
        if self.text and self.text.format:
            self._constraint = text_format_constraint(self.text.format)
        if self.background and not self.store:
            raise ValueError("background: a background response must be stored (store=true)")
        return self

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._function_tools

    @property
    def function_tool_choice(self) -> ToolChoice | None:
        # `auto` without tools asks for nothing (agent frameworks send it with an empty tool list).
        return None if self._tool_choice == "auto" and not self._function_tools else self._tool_choice

    @property
    def constraint(self) -> Constraint | None:
        """What the output text must match (`text.format`); None: free text."""
        return self._constraint

    def sampling(self) -> SamplingParams:
        given = {"max_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p}
        return SamplingParams(**{key: value for key, value in given.items() if value is not None})

    def _echoed_format(self) -> dict[str, Any]:
        given = self.text.format if self.text and self.text.format else {"type": "text"}
        if given.get("type") == "json_schema":
            return {
                "type": "json_schema",
                "description": None,
                "strict": False,
                **given,
            }  # OpenAI echoes both, with these defaults
        return given

    def echoed(self) -> dict[str, Any]:
        """The request fields a Response object repeats."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls if self.parallel_tool_calls is not None else True,
            "previous_response_id": self.previous_response_id,
            "temperature": self.temperature if self.temperature is not None else 1.0,
            "top_p": self.top_p if self.top_p is not None else 1.0,
            "tool_choice": self.tool_choice or "auto",
            "tools": self.tools or [],
            "text": {**(self.text.model_dump() if self.text else {}), "format": self._echoed_format()},
            "truncation": "disabled",
            "store": self.store,
            "background": self.background,
            "user": self.user,
            "prompt_cache_key": self.prompt_cache_key,
            "safety_identifier": self.safety_identifier,
        }
