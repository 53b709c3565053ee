"""Deployments in NATS: records in KV (every write a compare-and-swap on the revision the writer read, like batch
jobs), commands between the edge and node agents on core NATS request/reply (a start command goes to the agents'
queue group, so exactly one agent takes it, and is never stored: it may carry SSH secrets), and each deployment's
output lines on `inf.logs.<id>`, kept in a stream with the last N lines per deployment so a reader gets history
first, then live lines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from broker import subjects
from broker.errors import BrokerUnavailable
from broker.kv import CasRecords
from broker.topology import _key_value, _stream
from contracts.deployments import (
    AgentReply,
    DeployCommand,
    Deployment,
    LogLine,
    ProcessStats,
    StopCommand,
)

log = structlog.get_logger(__name__)

_LOG_MAX_AGE_S = 7 * 86_400.0

__all__ = ["DeploymentBus", "DeploymentStore", "ensure_deployments"]


async def ensure_deployments(js: JetStreamContext, log_history: int, replicas: int = 1) -> KeyValue:
    """The records bucket (file storage: deployments outlive restarts) and the log stream keeping the last
    `log_history` lines of each deployment."""
    await _stream(
        js,
        StreamConfig(
            name=subjects.DEPLOY_LOG_STREAM,
            subjects=[subjects.DEPLOY_LOG_WILDCARD],
            storage=StorageType.FILE,
            max_msgs_per_subject=log_history,
            max_age=_LOG_MAX_AGE_S,
            num_replicas=replicas,
        ),
    )
    return await _key_value(
        js, KeyValueConfig(bucket=subjects.DEPLOYMENTS_BUCKET, history=5, storage=StorageType.FILE, replicas=replicas)
    )


class DeploymentStore(CasRecords[Deployment]):
    def __init__(self, kv: KeyValue):
        super().__init__(kv, Deployment, "deployment", subjects.deployment_key)

    @classmethod
    async def open(cls, js: JetStreamContext, log_history: int, replicas: int = 1) -> DeploymentStore:
        return cls(await ensure_deployments(js, log_history, replicas))


class DeploymentBus:
    """Commands and output of deployments on NATS, for both sides (edge and agent)."""

    def __init__(self, nc: NatsClient):
        self._nc = nc

    # --- edge side ---

    async def start(self, command: DeployCommand, timeout_s: float) -> AgentReply | None:
        """Hand the command to one agent; None when no agent is listening."""
        return await self._request(subjects.DEPLOY_START_SUBJECT, command.to_bytes(), timeout_s)

    async def stop(self, deployment_id: str, timeout_s: float) -> AgentReply | None:
        """Ask the agent holding the deployment to stop it; None when no agent holds it."""
        return await self._request(
            subjects.deploy_stop_subject(deployment_id), StopCommand(deployment_id=deployment_id).to_bytes(), timeout_s
        )

    async def stats(self, deployment_id: str, timeout_s: float) -> ProcessStats | None:
        try:
            msg = await self._nc.request(subjects.deploy_stats_subject(deployment_id), b"", timeout=timeout_s)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
            return None
        try:
            return ProcessStats.from_bytes(msg.data)
        except ValidationError:
            return None

    async def log_lines(self, deployment_id: str) -> AsyncIterator[LogLine]:
        """The kept history of the deployment's output, then live lines, until the caller stops iterating."""
        sub = await self._nc.jetstream().subscribe(
            subjects.deploy_log_subject(deployment_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            async for msg in sub.messages:
                try:
                    yield LogLine.from_bytes(msg.data)
                except ValidationError:
                    log.warning("deployment.invalid_log_line", subject=msg.subject)
        finally:
            await sub.unsubscribe()

    async def _request(self, subject: str, payload: bytes, timeout_s: float) -> AgentReply | None:
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout_s)
        except nats.errors.NoRespondersError:
            return None
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BrokerUnavailable(f"no agent answered on {subject} within {timeout_s:g} s") from exc
        return AgentReply.from_bytes(msg.data)

    # --- agent side ---

    async def serve_starts(self, handler: Callable[[Msg], Awaitable[None]]):
        """Receive start commands as one member of the agents' queue group."""
        return await self._nc.subscribe(subjects.DEPLOY_START_SUBJECT, queue=subjects.AGENT_QUEUE_GROUP, cb=handler)

    async def serve_stop(self, deployment_id: str, handler: Callable[[Msg], Awaitable[None]]):
        return await self._nc.subscribe(subjects.deploy_stop_subject(deployment_id), cb=handler)

    async def serve_stats(self, deployment_id: str, handler: Callable[[Msg], Awaitable[None]]):
        return await self._nc.subscribe(subjects.deploy_stats_subject(deployment_id), cb=handler)

    async def publish_log(self, deployment_id: str, line: LogLine) -> None:
        """Core publish: the log stream stores it; a lost line is not worth blocking the reader of a pipe."""
        await self._nc.publish(subjects.deploy_log_subject(deployment_id), line.to_bytes())
