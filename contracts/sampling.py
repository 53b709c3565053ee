"""Sampling parameters: the one place where their bounds are validated. vLLM names and semantics."""

from __future__ import annotations

from typing import Self

from pydantic import Field, field_validator, model_validator

from contracts.base import Contract

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 512
INT64_MAX = 2**63 - 1


class SamplingParams(Contract):
    n: int = Field(default=1, ge=1, le=64, description="Choices returned.")
    best_of: int | None = Field(default=None, ge=1, le=64, description="Candidates generated; the n best returned.")
    max_tokens: int | None = Field(default=None, ge=1, description="None: the rest of the context.")
    min_tokens: int = Field(default=0, ge=0, description="EOS and stop tokens are suppressed until this many.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: off.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="HF-style, multiplicative.")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> bias in [-100, 100].")
    seed: int | None = Field(default=None, ge=-(2**63), le=INT64_MAX)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=1024)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="Top-k per token; 0 = sampled only.")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float]) -> dict[int, float]:
        for token_id, bias in value.items():
            if token_id < 0:
                raise ValueError(f"logit_bias token id {token_id} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {token_id} is {bias}, outside [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings_usable(cls, value: list[str]) -> list[str]:
        for stop in value:
            if not stop:
                raise ValueError("stop strings must not be empty")
            if len(stop) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings are limited to {MAX_STOP_STRING_CHARS} characters")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids_non_negative(cls, value: list[int]) -> list[int]:
        if any(token_id < 0 for token_id in value):
            raise ValueError("stop_token_ids must be non-negative")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_candidates(self) -> int:
        return self.best_of or self.n
