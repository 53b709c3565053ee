"""Deployments: the record kept in KV (status changes only by compare-and-swap, along `TRANSITIONS`), the commands
the edge sends to node agents over core NATS, and what agents publish about a running deployment (log lines,
process statistics). SSH secrets appear only in `DeployCommand`, never in the record."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import Field, SecretStr, field_serializer, model_validator

from contracts.base import SCHEMA_VERSION, Contract


class DeploymentStatus(StrEnum):
    QUEUED = "queued"  # taken by an agent, nothing started yet
    STARTING = "starting"  # the worker process runs; waiting for it to register and answer a probe
    ACTIVE = "active"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        return self in (DeploymentStatus.FAILED, DeploymentStatus.STOPPED)


# starting → starting and active → starting: an agent restarted after a crash starts the deployment's worker again.
TRANSITIONS: dict[DeploymentStatus, frozenset[DeploymentStatus]] = {
    DeploymentStatus.QUEUED: frozenset({DeploymentStatus.STARTING, DeploymentStatus.FAILED, DeploymentStatus.STOPPED}),
    DeploymentStatus.STARTING: frozenset(
        {DeploymentStatus.STARTING, DeploymentStatus.ACTIVE, DeploymentStatus.FAILED, DeploymentStatus.STOPPED}
    ),
    DeploymentStatus.ACTIVE: frozenset({DeploymentStatus.STARTING, DeploymentStatus.FAILED, DeploymentStatus.STOPPED}),
}


class InvalidDeploymentTransition(ValueError):
    """A status change the lifecycle does not allow (e.g. an agent marking a stopped deployment active)."""


class Deployment(Contract):
    """One deployment as stored in KV. Times are Unix seconds."""

    v: int = SCHEMA_VERSION
    id: str
    owner: str = Field(description="Caller identity that may see and stop it (api/auth: `caller.owner`).")
    model_id: str
    user_id: str | None = None
    api_name: str | None = None
    status: DeploymentStatus = DeploymentStatus.QUEUED
    created_at: float
    updated_at: float
    api_url: str | None = Field(default=None, description="Base URL of the edge that accepted it.")
    error: str | None = Field(default=None, description="Why it failed.")
    ssh_host: str | None = None
    ssh_username: str | None = None
    ssh_port: int | None = None
    agent_id: str | None = None
    host: str | None = Field(default=None, description="Host name the worker process runs on.")
    pid: int | None = None
    worker_id: str | None = Field(default=None, description="The worker's registry id once it registered.")
    served_model: str | None = Field(default=None, description="The model id clients send to reach it.")
    started_at: float | None = None

    def transition(self, status: DeploymentStatus, now: float, **changes: Any) -> Self:
        if status not in TRANSITIONS.get(self.status, frozenset()):
            raise InvalidDeploymentTransition(f"deployment {self.id} is {self.status}; it cannot become {status}")
        return self.model_copy(update={**changes, "status": status, "updated_at": now})


class SshConfig(Contract):
    """Where to launch a worker over SSH. The secret is revealed only when the command is serialized for the
    agent; `repr()` and logs show `**********`."""

    host: str = Field(min_length=1, max_length=255)
    username: str = Field(min_length=1, max_length=64)
    port: int = Field(default=22, ge=1, le=65535)
    password: SecretStr | None = None
    private_key: SecretStr | None = Field(default=None, description="PEM/OpenSSH private key text.")

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.password is None) == (self.private_key is None):
            raise ValueError("ssh_config needs exactly one of password or private_key")
        return self

    @field_serializer("password", "private_key", when_used="json")
    def _reveal(self, secret: SecretStr | None) -> str | None:
        return None if secret is None else secret.get_secret_value()


class DeployCommand(Contract):
    """Edge → one agent (queue group): start this deployment. The agent replies with `AgentReply`."""

    v: int = SCHEMA_VERSION
    deployment_id: str
    model_id: str
    ssh: SshConfig | None = None


class StopCommand(Contract):
    """Edge → the agent running a deployment: stop it. The agent replies once the worker is gone."""

    v: int = SCHEMA_VERSION
    deployment_id: str


class AgentReply(Contract):
    v: int = SCHEMA_VERSION
    agent_id: str
    ok: bool = True
    error: str | None = None


class LogLine(Contract):
    """One line of a deployment's output (the worker's stdout/stderr, or a note from the agent). `final` marks the
    last line of a deployment: a log stream ends after it."""

    v: int = SCHEMA_VERSION
    timestamp: float
    content: str
    source: str = Field(default="worker", description="worker or agent")
    final: bool = False


class ProcessStats(Contract):
    """A deployment's worker process, as the agent holding it sees it."""

    v: int = SCHEMA_VERSION
    host: str | None = None
    pid: int | None = None
    is_running: bool
    started_at: float | None = None
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    memory_total_bytes: int | None = None
