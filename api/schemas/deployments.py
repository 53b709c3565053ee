"""Wire shapes of the deployment API (Aphrodite guide, "Deployment Management" and "Log Streaming"): the deploy
body, the deploy answer, the status object, and the SSE event payloads of the log stream."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from contracts.deployments import Deployment, DeploymentStatus, ProcessStats, SshConfig

# What a model id may look like at the edge: a hub id / packaged name (`org/name`), or a path on the machine
# that runs the worker. Whether it resolves is only known there (the agent checks before starting it).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_PATH = re.compile(r"^(/|\./|\.\./|~/)[^\x00-\x1f\x7f]*$")
MAX_MODEL_ID = 256


def model_id_problem(model_id: str) -> str | None:
    """Why `model_id` can never name a model (None if it might): neither a hub id nor a path."""
    if not model_id.strip():
        return "the model id is empty"
    if len(model_id) > MAX_MODEL_ID:
        return f"the model id is longer than {MAX_MODEL_ID} characters"
    if _PATH.match(model_id) or (_HUB_ID.match(model_id) and ".." not in model_id and "--" not in model_id):
        return None
    return (
        f"invalid model id {model_id!r}: use a hub id (org/name), a packaged model name, or a path to a model "
        f"directory or .gguf file on the worker's machine"
    )


class SshConfigBody(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    host: str = Field(min_length=1, max_length=255, description="Host to start the worker on.")
    username: str = Field(min_length=1, max_length=64)
    port: int = Field(default=22, ge=1, le=65535)
    password: SecretStr | None = Field(default=None, description="Used for this login only; never stored.")
    private_key: SecretStr | None = Field(
        default=None, description="Private key text (PEM/OpenSSH), instead of a password; used once, never stored."
    )

    def to_contract(self) -> SshConfig:
        return SshConfig(
            host=self.host, username=self.username, port=self.port, password=self.password, private_key=self.private_key
        )


class DeployRequest(BaseModel):
    """`POST /api/v1/deploy`. Without `ssh_config` a node agent (`inferq agent`) starts the worker on its own
    machine; with it, an agent starts the worker on that host over SSH."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    model_id: str = Field(
        description="Packaged model name, hub id, or a model directory / .gguf path on the worker's machine."
    )
    user_id: str | None = Field(default=None, max_length=256)
    api_name: str | None = Field(default=None, max_length=256)
    ssh_config: SshConfigBody | None = None


class DeployResponse(BaseModel):
    status: DeploymentStatus
    deployment_id: str
    model_id: str
    monitor_url: str


def seed_time(timestamp: float | None) -> str | None:
    """`2025-03-14T23:55:12`: the Aphrodite guide's created_at/updated_at (UTC, seconds)."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def log_time(timestamp: float) -> str:
    """`2025-03-15T05:08:40.768Z`: the Aphrodite guide's log line timestamps."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def container_id(deployment: Deployment) -> str | None:
    """The Aphrodite guide's container is our worker process: its registry id once it registered."""
    return deployment.worker_id


def status_object(deployment: Deployment) -> dict:
    """The Aphrodite guide's status object (its seven keys first), plus what a person needs to use or debug it."""
    active = deployment.status is DeploymentStatus.ACTIVE
    return {
        "status": deployment.status.value,
        "deployment_id": deployment.id,
        "model_id": deployment.model_id,
        "container_id": container_id(deployment),
        "api_url": deployment.api_url if active else None,
        "created_at": seed_time(deployment.created_at),
        "updated_at": seed_time(deployment.updated_at),
        "api_name": deployment.api_name,
        "user_id": deployment.user_id,
        "served_model": deployment.served_model,
        "host": deployment.host or deployment.ssh_host,
        "error": deployment.error,
    }


def deployment_info_event(deployment: Deployment) -> dict:
    return {
        "deployment_id": deployment.id,
        "model_id": deployment.model_id,
        "status": deployment.status.value,
        "container_id": container_id(deployment),
    }


def metadata_event(deployment: Deployment, stats: ProcessStats | None, now: float) -> dict:
    """`{container_id, timestamp, is_running, started_at, cpu_usage: "1.90%", memory_usage: "10.75GiB /
    125.7GiB"}` as in the Aphrodite guide, plus the worker's `host` and `pid`."""
    started = stats.started_at if stats and stats.started_at else deployment.started_at
    return {
        "container_id": container_id(deployment),
        "timestamp": datetime.fromtimestamp(now, UTC).replace(tzinfo=None).isoformat(),
        "is_running": bool(stats and stats.is_running),
        "started_at": None
        if started is None
        else datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "cpu_usage": None if stats is None or stats.cpu_percent is None else f"{stats.cpu_percent:.2f}%",
        "memory_usage": _memory(stats),
        "host": (stats.host if stats else None) or deployment.host,
        "pid": (stats.pid if stats else None) or deployment.pid,
    }


def _memory(stats: ProcessStats | None) -> str | None:
    if stats is None or stats.memory_bytes is None:
        return None
    used = _gib(stats.memory_bytes)
    return f"{used} / {_gib(stats.memory_total_bytes)}" if stats.memory_total_bytes else used


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f}GiB"
