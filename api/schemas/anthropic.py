"""Anthropic Messages wire requests (`POST /v1/messages`, `/v1/messages/count_tokens`). Text content only for
now: tool use needs tool calling in the engine (docs/structured-outputs.md), so a request that would need it is
refused with a clear message rather than answered as if the tools were not there. Unknown fields are refused too
(as Anthropic does): a field such as `thinking` changes what is generated, and silently dropping it would lie."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.schemas.openai import ChatMessage
from contracts import SamplingParams

TOOL_USE_UNSUPPORTED = "tool use is not yet supported by this server (tool calling is not wired into the engine)"
_TOOL_BLOCKS = frozenset({"tool_use", "tool_result", "server_tool_use", "web_search_tool_result"})
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
        if kind in _TOOL_BLOCKS:
            raise ValueError(f"{kind} blocks: {TOOL_USE_UNSUPPORTED}")
        if reason := _KNOWN_UNSERVED_BLOCKS.get(kind):
            raise ValueError(reason)
        if isinstance(block, dict) and kind != "text":
            raise ValueError(f"unknown content block type {kind!r}: expected 'text'")
        if isinstance(block, dict) and not isinstance(block.get("text"), str):
            raise ValueError("a text block needs `text` (a string)")
    return content


def _joined(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    _blocks = field_validator("content", mode="before")(_served_blocks)


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # disable_parallel_tool_use, name
    type: Literal["auto", "any", "tool", "none"]


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

    _blocks = field_validator("system", mode="before")(_served_blocks)

    @model_validator(mode="after")
    def _no_tool_use(self):
        # Tools with tool_choice none are never called, so the conversation is served as text; anything else
        # (auto is the default with tools) would need the engine to produce tool calls.
        if self.tools and (self.tool_choice is None or self.tool_choice.type != "none"):
            raise ValueError(f"tools: {TOOL_USE_UNSUPPORTED}; send tool_choice {{'type': 'none'}} or no tools")
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool"):
            raise ValueError(f"tool_choice: {TOOL_USE_UNSUPPORTED}")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation in the chat template's terms (the system prompt first, if any)."""
        chat = [ChatMessage(role="system", content=_joined(self.system))] if self.system else []
        return chat + [ChatMessage(role=message.role, content=_joined(message.content)) for message in self.messages]

    @property
    def prefilled(self) -> bool:
        """A final assistant message is a prefill: the reply continues it (as Anthropic's API does)."""
        return self.messages[-1].role == "assistant"


class MessagesRequest(MessagesInput):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: accepted, no effect

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
