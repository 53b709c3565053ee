"""Requests published to a model's work queue (JetStream) and cancels (core NATS)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from contracts.base import SCHEMA_VERSION, Contract
from contracts.constraints import Constraint
from contracts.sampling import SamplingParams

# Batch-lane work (api batch runner) runs at this priority: inside a worker, interactive requests (priority 0) are
# admitted first and batch lines are preempted first.
BATCH_PRIORITY = 10


class GenerateRequest(Contract):
    """One generation: the worker streams events for it to `reply_subject`."""

    v: int = SCHEMA_VERSION
    kind: Literal["generate"] = "generate"
    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    model: str
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    reply_subject: str = Field(description="Core NATS subject the worker publishes events to.")
    deadline: float | None = Field(default=None, description="Unix time after which the request is dropped.")
    attempt: int = Field(default=1, ge=1, description="Bumped by the edge when it resubmits.")
    resume_token_ids: list[int] = Field(
        default_factory=list, description="Tokens already delivered; generation continues after them (n=1 only)."
    )
    priority: int = Field(default=0, description="Lower runs first (vLLM convention).")
    constraint: Constraint | None = Field(
        default=None,
        description=(
            "Structured output: every choice is forced to match it (JSON schema, JSON object, regex, choice or "
            "grammar). A worker that cannot compile it answers invalid_request."
        ),
    )
    cache_salt: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "Prefix-cache partition: a worker reuses prompt KV only between requests with the same salt. The edge "
            "sets a digest of the API key owner (never the key); requests without one share only among themselves."
        ),
    )


class Pooling(StrEnum):
    MEAN = "mean"
    MAX = "max"
    LAST_TOKEN = "last_token"
    ABS_MAX = "abs_max"
    NONE = "none"  # one vector per token


class EmbedRequest(Contract):
    """Hidden states of one or more inputs, pooled. Layer 0 is the token embeddings, layer k the output of block
    k, the last layer is taken after the final norm; negative layers count from the end (-1 = last)."""

    v: int = SCHEMA_VERSION
    kind: Literal["embed"] = "embed"
    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    model: str
    inputs: list[list[int]] = Field(min_length=1, max_length=2048)
    layers: list[int] = Field(default_factory=lambda: [-1], min_length=1, max_length=64)
    pooling: list[Pooling] = Field(default_factory=lambda: [Pooling.MEAN], min_length=1, max_length=5)
    normalize: bool = Field(default=True, description="L2-normalise each pooled vector.")
    reply_subject: str
    deadline: float | None = None
    attempt: int = Field(default=1, ge=1)
    priority: int = 0


WorkRequest = Annotated[GenerateRequest | EmbedRequest, Field(discriminator="kind")]
_work_adapter: TypeAdapter[WorkRequest] = TypeAdapter(WorkRequest)


def parse_work_request(data: bytes | str) -> GenerateRequest | EmbedRequest:
    return _work_adapter.validate_json(data)


class CancelRequest(Contract):
    v: int = SCHEMA_VERSION
    request_id: str
    reason: str = "client disconnected"
    up_to_attempt: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Cancel the attempts up to this one (None: every attempt). A client that re-attaches to its request "
            "elsewhere continues it as a newer attempt, which the cancel sent when it left must not stop."
        ),
    )

    def covers(self, attempt: int) -> bool:
        return self.up_to_attempt is None or attempt <= self.up_to_attempt
