"""Anthropic Messages wire requests (`POST /v1/messages`, `/v1/messages/count_tokens`): text, `tool_use` and
`tool_result` blocks, custom tools and `tool_choice`, read into chat's terms (OpenAI-shaped chat messages with
`tool_calls` / `tool` messages, function tools and their choice) so the tool plan (api/tools/plan.py) renders and
reads them as on every surface. What is not served (images, documents, thinking, server tools) is refused with a
clear message, and so are unknown fields (as Anthropic does): a field such as `thinking` changes what is
generated, and silently dropping it would lie."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from api.schemas.openai import ChatMessage
from api.tools.definitions import (
    CalledFunction,
    FunctionDefinition,
    FunctionTool,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
)
from api.tools.definitions import ToolChoice as FunctionToolChoice
from contracts import SamplingParams

_SERVER_TOOL_BLOCKS = frozenset({"server_tool_use", "web_search_tool_result", "web_fetch_tool_result"})
_CONTENT_BLOCKS = ("text", "tool_use", "tool_result")
_KNOWN_UNSERVED_BLOCKS = {
    "image": "image content is not supported: the served models read text only",
    "document": "document content is not supported: send the text as a text block",
    "thinking": "thinking blocks are not supported",
    "redacted_thinking": "thinking blocks are not supported",
}


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: accepted, no effect on the output
    type: Literal["text"]
    text: str


def _served_blocks(content: Any) -> Any:
    """Refuse a block list with a block we do not serve, naming the block: left to the union of `str` and the
    block list, the error would be about the string alternative."""
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _SERVER_TOOL_BLOCKS:
            raise ValueError(f"{kind} blocks: server tools are not supported by this server (define custom tools)")
        if reason := _KNOWN_UNSERVED_BLOCKS.get(kind):
            raise ValueError(reason)
        if isinstance(block, dict) and kind not in _CONTENT_BLOCKS:
            raise ValueError(f"unknown content block type {kind!r}: expected one of {', '.join(_CONTENT_BLOCKS)}")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise ValueError("a text block needs `text` (a string)")
    return content


def _text_only(content: Any) -> Any:
    """Where only text blocks may stand (the system prompt, a tool result's content)."""
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise ValueError(_KNOWN_UNSERVED_BLOCKS.get(kind) or f"only text blocks are allowed here, not {kind!r}")
    return _served_blocks(content)


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    _text = field_validator("content", mode="before")(_text_only)

    def text(self) -> str:
        text = _joined(self.content or "")
        return f"Error: {text}" if self.is_error else text


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


def _joined(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[Block]

    _blocks = field_validator("content", mode="before")(_served_blocks)

    @model_validator(mode="after")
    def _blocks_of_the_role(self):
        wrong = {"user": "tool_use", "assistant": "tool_result"}[self.role]
        if isinstance(self.content, list) and any(block.type == wrong for block in self.content):
            raise ValueError(f"{self.role} messages cannot hold {wrong} blocks")
        return self

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock]:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else list(self.content)

    def chat_messages(self) -> list[ChatMessage]:
        """In chat's terms: an assistant turn is one message with its text and its calls; a user turn is a `tool`
        message per tool_result, in place, and a user message per run of text."""
        blocks = self.blocks()
        if self.role == "assistant":
            calls = [
                MessageToolCall(
                    id=block.id, function=CalledFunction(name=block.name, arguments=json.dumps(block.input))
                )
                for block in blocks
                if isinstance(block, ToolUseBlock)
            ]
            text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
            return [ChatMessage(role="assistant", content=text, tool_calls=calls or None)]
        messages: list[ChatMessage] = []
        for block in blocks:
            if isinstance(block, ToolResultBlock):
                messages.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=block.text()))
            elif messages and messages[-1].role == "user":
                messages[-1].content = messages[-1].text() + block.text
            else:
                messages.append(ChatMessage(role="user", content=block.text))
        return messages


class CustomTool(BaseModel):
    """A client tool (`{"name", "description", "input_schema"}`, `type` "custom" or absent)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = None  # accepted, no effect (no prompt cache here)

    def function_tool(self) -> FunctionTool:
        return FunctionTool(
            function=FunctionDefinition(name=self.name, description=self.description, parameters=self.input_schema)
        )


def _custom_tools(tools: list[dict[str, Any]]) -> list[FunctionTool]:
    converted = []
    for index, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise ValueError(
                f"tools[{index}]: {tool.get('type')!r} is a server tool, which this server does not run (define a "
                "custom tool with name, description and input_schema)"
            )
        try:
            converted.append(CustomTool.model_validate(tool).function_tool())
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"] if part != "function")
            raise ValueError(f"tools[{index}].{where}: {error['msg']}") from None
    return converted


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # with type tool
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named_when_tool(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name: required with type 'tool', and only then")
        return self

    def function_choice(self) -> FunctionToolChoice:
        """auto and none as they are; any is OpenAI's required; tool is a named function."""
        if self.type == "tool":
            assert self.name is not None
            return NamedToolChoice(function=NamedFunction(name=self.name))
        return {"any": "required", "auto": "auto", "none": "none"}[self.type]  # type: ignore[return-value]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = None


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # no reasoning models here: no effect
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _no_format(cls, value: dict[str, Any] | None) -> None:
        if value is not None:
            raise ValueError("structured output (output_config.format) is not yet supported on /v1/messages")
        return None


class MessagesInput(BaseModel):
    """What `/v1/messages` and `/v1/messages/count_tokens` share: the conversation, which becomes the prompt."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    # Accepted without effect, as the SDKs send them: there is one region, one speed, and no prompt cache to mark.
    cache_control: dict[str, Any] | None = None
    speed: Literal["standard", "fast"] | None = None
    inference_geo: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    _blocks = field_validator("system", mode="before")(_text_only)
    _function_tools: list[FunctionTool] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _read_tools(self):
        self._function_tools = _custom_tools(self.tools or [])
        _check_tool_results(self.messages)
        last = self.messages[-1]
        if last.role == "assistant" and any(isinstance(block, ToolUseBlock) for block in last.blocks()):
            raise ValueError("messages: the final assistant message has tool_use blocks; answer them with tool_result")
        return self

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._function_tools

    @property
    def function_tool_choice(self) -> FunctionToolChoice | None:
        if self.tool_choice is None or (self.tool_choice.type == "auto" and not self._function_tools):
            return None  # auto without tools asks for nothing
        return self.tool_choice.function_choice()

    @property
    def parallel_tool_calls(self) -> bool:
        return not (self.tool_choice is not None and self.tool_choice.disable_parallel_tool_use)

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation in the chat template's terms (the system prompt first, if any)."""
        chat = [ChatMessage(role="system", content=_joined(self.system))] if self.system else []
        return chat + [turn for message in self.messages for turn in message.chat_messages()]

    @property
    def prefilled(self) -> bool:
        """A final assistant message is a prefill: the reply continues it (as Anthropic's API does)."""
        return self.messages[-1].role == "assistant"


def _check_tool_results(messages: list[Message]) -> None:
    """Each tool_result answers a tool_use of the assistant message just before (as Anthropic requires)."""
    offered: set[str] = set()
    for position, message in enumerate(messages):
        for index, block in enumerate(message.blocks()):
            if isinstance(block, ToolResultBlock) and block.tool_use_id not in offered:
                raise ValueError(
                    f"messages[{position}].content[{index}]: tool_result for tool_use_id {block.tool_use_id!r} has "
                    "no tool_use block with that id in the assistant message before it"
                )
        offered = {block.id for block in message.blocks() if isinstance(block, ToolUseBlock)}


class MessagesRequest(MessagesInput):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: accepted, no effect
    # Server-held conversation state (the SDK's message threads): read only to refuse it in the way the SDK understands
    # (api/serving/messages.py), after which it sends the whole conversation each turn.
    thread: dict[str, Any] | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_stops(cls, stops: list[str] | None) -> list[str] | None:
        if stops and any(stop == "" for stop in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    def sampling(self) -> SamplingParams:
        given = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop_sequences or [],
        }
        return SamplingParams(**{key: value for key, value in given.items() if value is not None})
