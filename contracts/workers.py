"""What a worker advertises in the registry (KV, refreshed on a heartbeat, expires when it stops)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from contracts.base import SCHEMA_VERSION, Contract


class DeviceInfo(Contract):
    kind: str = Field(description="cpu or cuda")
    name: str
    index: int | None = None
    total_memory_gb: float | None = None
    free_memory_gb: float | None = None
    compute_capability: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None


class WorkerInfo(Contract):
    v: int = SCHEMA_VERSION
    worker_id: str
    model: str = Field(description="The served model id clients use.")
    model_source: str = Field(description="Where the weights came from (path or hub id).")
    max_model_len: int
    capacity: int = Field(description="Sequences the worker decodes at once.")
    running: int = 0
    waiting: int = 0
    device: DeviceInfo
    dtype: str
    host: str
    pid: int
    started_at: float
    updated_at: float
    tokenizer_object: str = Field(description="Object-store name of the tokenizer archive for this model.")
    compiled_decode: Literal["compiling", "ready", "failed"] | None = Field(
        default=None,
        description=(
            "The compiled small decode step (docs/compiled-decode.md): compiling (serving eager meanwhile), ready, "
            "failed (eager), or None without one."
        ),
    )
