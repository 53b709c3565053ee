"""Tokenizer wire requests: vLLM's `/tokenize` + `/detokenize` (plus the Aphrodite guide's `{"text"}`) and Aleph
Alpha's, which share the same paths. The body decides which one it is; see `tokenize_shape`/`detokenize_shape`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from api.schemas.aleph import AlephDetokenizeRequest, AlephTokenizeRequest
from api.schemas.openai import ChatMessage, OpenAIRequest

Shape = Literal["aleph", "vllm"]


class TokenizeRequest(OpenAIRequest):
    """vLLM's completion form (`prompt`) or chat form (`messages`); the Aphrodite guide calls it `text`."""

    unsupported: ClassVar[dict[str, str]] = {
        "chat_template": "custom chat templates are not supported; the model's own template is used",
        "chat_template_kwargs": "chat_template_kwargs is not supported",
        "tools": "tool definitions are not supported",
    }

    model: str | None = Field(default=None, description="Default: the first served model.")
    prompt: str | None = None
    text: str | None = Field(default=None, description="The Aphrodite deployment guide's name for `prompt`.")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = Field(
        default=None, description="Default: true for a prompt, false for messages (the chat template writes its own)."
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("prompt", "text", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, text or messages")
        return self

    @property
    def text_input(self) -> str | None:
        return self.prompt if self.prompt is not None else self.text


class DetokenizeRequest(OpenAIRequest):
    model: str | None = Field(default=None, description="Default: the first served model.")
    tokens: list[int]


def tokenize_shape(body: Any) -> Shape | None:
    """Aleph Alpha's body carries `tokens`/`token_ids` booleans (what to return); vLLM's never does."""
    if isinstance(body, dict):
        return "aleph" if any(isinstance(body.get(key), bool) for key in ("tokens", "token_ids")) else "vllm"
    return _SHAPES.get(type(body))


def detokenize_shape(body: Any) -> Shape | None:
    """Aleph Alpha sends `token_ids`, vLLM `tokens`."""
    if isinstance(body, dict):
        return "aleph" if "token_ids" in body else "vllm"
    return _SHAPES.get(type(body))


_SHAPES: dict[type, Shape] = {
    AlephTokenizeRequest: "aleph",
    AlephDetokenizeRequest: "aleph",
    TokenizeRequest: "vllm",
    DetokenizeRequest: "vllm",
}

AnyTokenizeRequest = Annotated[
    Annotated[AlephTokenizeRequest, Tag("aleph")] | Annotated[TokenizeRequest, Tag("vllm")],
    Discriminator(tokenize_shape),
]
AnyDetokenizeRequest = Annotated[
    Annotated[AlephDetokenizeRequest, Tag("aleph")] | Annotated[DetokenizeRequest, Tag("vllm")],
    Discriminator(detokenize_shape),
]
