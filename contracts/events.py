"""Events a worker streams back for one request, in order, each with a per-request sequence number so the
edge can detect gaps: accepted → tokens* → end, heartbeats while silent, or error."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from contracts.base import Contract
from contracts.errors import ErrorInfo

LOGPROB_FLOOR = -9999.0
"""Logprobs on the wire are clamped to this: -inf breaks JSON, and vLLM clamps to the same value."""


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class TopLogprob(Contract):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(Contract):
    """Logprob of one chosen (or prompt) token plus the top alternatives. -inf is clamped by the producer."""

    token_id: int
    token: str
    logprob: float
    rank: int | None = None
    top: list[TopLogprob] = Field(default_factory=list)


class ChoiceDelta(Contract):
    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = Field(default=None, description="The stop string or token id that ended it.")


class Usage(Contract):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = Field(
        default=0,
        ge=0,
        description="Prompt tokens whose KV came from the worker's prefix cache (OpenAI's prompt_tokens_details).",
    )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Event(Contract):
    request_id: str
    seq: int = Field(ge=0, description="Per request and attempt: 0 for accepted, then +1 per event.")
    attempt: int = Field(default=1, ge=1, description="The attempt this event belongs to; older ones are stale.")


class Accepted(_Event):
    kind: Literal["accepted"] = "accepted"
    worker_id: str
    attempt: int = 1
    resumed_tokens: int = Field(
        default=0,
        ge=0,
        description=(
            "Completion tokens this attempt continues from (its resume_token_ids): the position of its first token."
        ),
    )


class Tokens(_Event):
    kind: Literal["tokens"] = "tokens"
    choices: list[ChoiceDelta]
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Heartbeat(_Event):
    kind: Literal["heartbeat"] = "heartbeat"


class EmbeddingVector(Contract):
    input_index: int
    layer: int = Field(description="Absolute layer index (negative requests are resolved).")
    pooling: str
    values: list[float] | list[list[float]] = Field(description="One vector, or one per token for pooling none.")


class Embeddings(_Event):
    kind: Literal["embeddings"] = "embeddings"
    vectors: list[EmbeddingVector]


class End(_Event):
    kind: Literal["end"] = "end"
    usage: Usage


class Failed(_Event):
    kind: Literal["error"] = "error"
    error: ErrorInfo


TokenEvent = Annotated[Accepted | Tokens | Embeddings | Heartbeat | End | Failed, Field(discriminator="kind")]
_event_adapter: TypeAdapter[TokenEvent] = TypeAdapter(TokenEvent)


def parse_event(data: bytes | str) -> Accepted | Tokens | Embeddings | Heartbeat | End | Failed:
    return _event_adapter.validate_json(data)
