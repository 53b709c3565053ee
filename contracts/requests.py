"""Requests published to a model's work queue (JetStream) and cancels (core NATS)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from contracts.base import SCHEMA_VERSION, Contract
from contracts.sampling import SamplingParams


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


class CancelRequest(Contract):
    v: int = SCHEMA_VERSION
    request_id: str
    reason: str = "client disconnected"
