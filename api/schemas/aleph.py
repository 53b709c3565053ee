"""Aleph Alpha wire requests, as `aleph-alpha-client` sends them (its defaults filled in, `None`s left out).
`AlephCompleteRequest.sampling()` converts to `contracts.SamplingParams`; what would change the result but has no
equivalent there is refused with the reason, never ignored (docs/api.md lists these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts import SamplingParams


class AlephRequest(BaseModel):
    # Unknown fields are allowed: the client grows new optional ones, and `hosting`/`tags` ride along.
    model_config = ConfigDict(extra="allow")

    model: str
    hosting: str | None = Field(
        default=None, description="Accepted and ignored: every request runs on this deployment's own workers."
    )
    tags: list[str] | None = Field(default=None, description="Client-internal; ignored.")


class AlephTokenizeRequest(AlephRequest):
    prompt: str
    tokens: bool = False
    token_ids: bool = False


class AlephDetokenizeRequest(AlephRequest):
    token_ids: list[int]


class _PromptItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    controls: list[dict[str, Any]] = Field(default_factory=list, description="Attention manipulation: refused.")


class TextItem(_PromptItem):
    type: Literal["text"]
    data: str


class TokenIdsItem(_PromptItem):
    type: Literal["token_ids"]
    data: list[int]


class ImageItem(_PromptItem):
    type: Literal["image"]
    data: Any = None


PromptItem = Annotated[TextItem | TokenIdsItem | ImageItem, Field(discriminator="type")]


class AlephPromptRequest(AlephRequest):
    """Requests that read a prompt of text / token_ids items; images and attention controls are refused."""

    prompt: str | list[PromptItem] = ""

    @model_validator(mode="after")
    def _text_prompt_only(self):
        items = self.prompt if isinstance(self.prompt, list) else []
        if any(isinstance(item, ImageItem) for item in items):
            raise ValueError("prompt: image prompt items are not supported (the served models read text only)")
        if any(item.controls for item in items):
            raise ValueError("prompt: attention controls are not supported")
        return self


class AlephEvaluateRequest(AlephPromptRequest):
    completion_expected: str = Field(min_length=1)
    contextual_control_threshold: float | None = None
    control_log_additive: bool | None = True


class AlephEmbedRequest(AlephPromptRequest):
    layers: list[int] = Field(min_length=1, max_length=64)
    pooling: list[Literal["mean", "max", "last_token", "abs_max"]] = Field(default_factory=list)
    type: str | None = None
    tokens: bool = False
    normalize: bool = False
    contextual_control_threshold: float | None = None
    control_log_additive: bool | None = True

    @model_validator(mode="after")
    def _no_semantic_type(self):
        if self.type is not None:
            raise ValueError("type: semantic embeddings (symmetric/document/query) are not supported; use layers")
        return self


class AlephCompleteRequest(AlephPromptRequest):
    maximum_tokens: int | None = None
    minimum_tokens: int = 0
    # "0 means off": temperature, top_k and top_p all 0 is greedy decoding.
    temperature: float | None = 0.0
    top_k: int | None = 0
    top_p: float | None = 0.0
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    sequence_penalty: float = 0.0
    sequence_penalty_min_length: int = 2
    repetition_penalties_include_prompt: bool | None = False
    repetition_penalties_include_completion: bool | None = True
    use_multiplicative_presence_penalty: bool | None = False
    use_multiplicative_frequency_penalty: bool = False
    use_multiplicative_sequence_penalty: bool = False
    penalty_bias: str | None = None
    penalty_exceptions: list[str] | None = None
    penalty_exceptions_include_stop_sequences: bool | None = None
    best_of: int | None = None
    n: int = 1
    logit_bias: dict[int, float] | None = None
    log_probs: int | None = None
    stop_sequences: list[str] | None = None
    tokens: bool = False
    disable_optimizations: bool = False
    echo: bool = False
    raw_completion: bool = False
    completion_bias_inclusion: list[str] | None = None
    completion_bias_inclusion_first_token_only: bool = False
    completion_bias_exclusion: list[str] | None = None
    completion_bias_exclusion_first_token_only: bool = False
    contextual_control_threshold: float | None = None
    control_log_additive: bool | None = True
    steering_concepts: list[str] | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _refuse_what_we_cannot_do(self):
        problem = next(self._unsupported(), None)
        if problem:
            raise ValueError(problem)
        return self

    def _unsupported(self):
        penalized = bool(self.presence_penalty or self.frequency_penalty)
        if self.sequence_penalty:
            yield "sequence_penalty: not supported"
        if self.use_multiplicative_presence_penalty and self.presence_penalty:
            yield "use_multiplicative_presence_penalty: only additive presence penalties are supported"
        if self.use_multiplicative_frequency_penalty and self.frequency_penalty:
            yield "use_multiplicative_frequency_penalty: only additive frequency penalties are supported"
        if penalized and self.repetition_penalties_include_prompt:
            yield "repetition_penalties_include_prompt: presence and frequency penalties count completion tokens only"
        if penalized and (self.penalty_bias or self.penalty_exceptions):
            yield "penalty_bias/penalty_exceptions: not supported"
        if self.completion_bias_inclusion or self.completion_bias_exclusion:
            yield "completion_bias_inclusion/completion_bias_exclusion: not supported"
        if self.steering_concepts:
            yield "steering_concepts: not supported"
        if self.stream and self.best_of is not None and self.best_of > self.n:
            yield "best_of: results cannot be streamed when best_of > n"

    def sampling(self) -> SamplingParams:
        # A nonzero top_k (> 1) or top_p asks for sampling even at temperature 0, which then means "no rescaling".
        sampled = bool(self.temperature) or (self.top_k or 0) > 1 or bool(self.top_p)
        # Penalties count completion tokens (the include_prompt case is refused above); with the completion
        # excluded too they count nothing.
        penalize = self.repetition_penalties_include_completion is not False
        given: dict[str, Any] = {
            "n": self.n,
            "best_of": self.best_of,
            "max_tokens": self.maximum_tokens,
            "min_tokens": self.minimum_tokens,
            "temperature": (self.temperature or 1.0) if sampled else 0.0,
            "top_k": self.top_k or 0,
            "top_p": self.top_p or 1.0,
            "presence_penalty": (self.presence_penalty or 0.0) if penalize else 0.0,
            "frequency_penalty": (self.frequency_penalty or 0.0) if penalize else 0.0,
            "logit_bias": self.logit_bias or {},
            "stop": self.stop_sequences or [],
            "logprobs": self.log_probs,
            # Echoed prompt tokens carry log_probs too, which only a prompt forward pass gives.
            "prompt_logprobs": self.log_probs if self.echo else None,
        }
        return SamplingParams(**{key: value for key, value in given.items() if value is not None})
