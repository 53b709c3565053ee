"""OpenAI wire requests (plus the vLLM-named extras). Each converts itself to `contracts.SamplingParams`, which
owns the bounds. Unknown fields are accepted and ignored as OpenAI SDKs send new ones; fields that would change
what is generated but that we do not implement are rejected, never silently ignored."""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from api.schemas.structured import DEPRECATED_GUIDED, requested_constraint
from api.tools.definitions import FunctionTool, MessageToolCall, ToolChoice
from contracts import SamplingParams
from contracts.constraints import Constraint

_MISSPELLING_CUTOFF = 0.85  # `store` vs `stop` (0.67) is a different field; `logprob` vs `logprobs` (0.93) is not


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # field -> why it is refused; a null/false/empty value is fine.
    unsupported: ClassVar[dict[str, str]] = {
        "tools": "tools are taken by /v1/chat/completions (and /v1/responses, /v1/messages), not here",
        "functions": "the legacy functions field is not supported; send tools",
        "function_call": "the legacy function_call field is not supported; send tool_choice",
        "use_beam_search": "beam search is not supported",
        **{name: f"removed in vLLM; use {instead}" for name, instead in DEPRECATED_GUIDED.items()},
        "logits_processors": "custom logits processors are not supported",
        "allowed_token_ids": "allowed_token_ids is not supported",
        "bad_words": "bad_words is not supported",
    }

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name in self.model_extra or {}:
            # A misspelt field (`max_token`, `temprature`) would otherwise be ignored without a word.
            if near := difflib.get_close_matches(name, type(self).model_fields, n=1, cutoff=_MISSPELLING_CUTOFF):
                raise ValueError(f"{name}: unknown field; did you mean {near[0]}?")
        for name, reason in self.unsupported.items():
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, [], {}, ""):
                raise ValueError(f"{name}: {reason}")
        response_format = (self.model_extra or {}).get("response_format")
        if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class GenerationFields(OpenAIRequest):
    """What completions and chat share."""

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None  # JSON keys are strings: token ids as text
    user: str | None = None
    # OpenAI's cache-routing hint: requests with the same key (of the same caller) go to the same worker.
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    # Structured output (docs/structured-outputs.md): OpenAI's field, or vLLM's; read into one wire constraint.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    _constraint: Constraint | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_constraint(self):
        self._constraint = requested_constraint(self.response_format, self.structured_outputs)
        return self

    @property
    def constraint(self) -> Constraint | None:
        """What the output must match (None: free text); its shape is checked, whether it compiles is not."""
        return self._constraint

    @property
    def constraint_param(self) -> str:
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def sampling(self, *, max_tokens: int | None, logprobs: int | None, best_of: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        given: dict[str, Any] = {
            "n": self.n,
            "best_of": best_of,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias or None,
            "seed": self.seed,
            "stop": stop,
            "stop_token_ids": self.stop_token_ids,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "logprobs": logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }
        return SamplingParams(**{key: value for key, value in given.items() if value is not None})

    @model_validator(mode="after")
    def _streamable(self):
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not available with stream=true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompt_present(self):
        if self.prompt == []:
            raise ValueError("prompt: must not be empty")
        if self.suffix:
            raise ValueError("suffix: this model does not support inserting text (no fill-in-the-middle)")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_dict(self) -> dict[str, Any]:
        """The message in the OpenAI shape the tool plan renders (api/tools/plan.py): text content, calls."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Tools (docs/api.md, "Tool calling"; planned per model by api/tools/plan.py)
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _logprobs_consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(OpenAIRequest):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @model_validator(mode="after")
    def _input_present(self):
        if self.input == [] or self.input == "":
            raise ValueError("input: must not be empty")
        return self
