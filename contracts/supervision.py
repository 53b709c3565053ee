"""What `inferq serve`'s supervisor reports about the processes it runs: a small JSON record it rewrites (atomically)
at every start, restart and give-up, in a file whose path it hands its children (`INFERQ_SUPERVISOR_STATUS_FILE`).
The api renders it on `/metrics`. A file, not NATS: the supervisor needs no NATS client, and the record stays
readable while the embedded nats-server is the process being restarted."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from contracts.base import SCHEMA_VERSION, Contract


class ProcessState(StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"  # crashed, waiting out its backoff
    GAVE_UP = "gave_up"  # crash loop or a configuration refusal: not started again until `inferq serve` is


class SupervisedProcess(Contract):
    name: str = Field(description="worker, worker-1, agent, api, nats-server ...")
    state: ProcessState
    restarts: int = Field(ge=0, description="Times it was started again after a crash, since `inferq serve` started.")
    reason: str | None = Field(default=None, description="Why it was given up.")


class SupervisorStatus(Contract):
    v: int = SCHEMA_VERSION
    updated_at: float = Field(description="Unix time of this record.")
    processes: list[SupervisedProcess]
