"""The Responses API request (`POST /v1/responses`). Items of `input` are checked one by one in
api/serving/response_items.py (clear messages per item); here only the envelope. What needs engine-enforced
structured output (tool calls, `text.format` json_schema / json_object) is refused, never ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts import SamplingParams

NOT_YET = "is not yet supported (it needs engine-enforced structured outputs)"


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None


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

    @model_validator(mode="after")
    def _refuse_what_needs_structured_output(self):
        if self.tools and self.tool_choice != "none":
            raise ValueError(f"tools: tool calling {NOT_YET}; send tool_choice 'none' to answer in text")
        if self.text and self.text.format and self.text.format.type != "text":
            raise ValueError(f"text.format: {self.text.format.type!r} {NOT_YET}")
        if self.background and not self.store:
            raise ValueError("background: a background response must be stored (store=true)")
        return self

    def sampling(self) -> SamplingParams:
        given = {"max_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p}
        return SamplingParams(**{key: value for key, value in given.items() if value is not None})

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
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": self.store,
            "background": self.background,
            "user": self.user,
        }
