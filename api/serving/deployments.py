"""`/api/v1/deploy` and `/api/v1/deployments…`: the edge creates the record (KV), hands the deploy command to one
node agent over NATS and answers `queued`; the agent moves the record along (ops/agent.py). Status and lists read
KV; a stop asks the agent holding the deployment; the log stream replays the kept output lines, then follows them
live, with the worker's process statistics asked from its agent.

Deployments belong to the caller that created them (`caller.owner`): others get the same 404 as for an unknown id.
Monitors may read every deployment's status and logs (that is their role); only admins see every owner's
otherwise. What non-admins may deploy is api/serving/deploy_policy.py; what they see of the logs (and of a
failure's reason) is the tenant view of api/serving/log_view.py: a worker serves every owner's requests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, NoReturn

import structlog
from fastapi import Depends
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NatsClient
from starlette.requests import HTTPConnection

from api.auth.caller import Caller, require_visible, visible_to
from api.errors import ApiError
from api.schemas.deployments import (
    DeployRequest,
    DeployResponse,
    deployment_info_event,
    log_time,
    metadata_event,
    model_id_problem,
    status_object,
)
from api.serving.deploy_policy import DeployPolicy
from api.serving.log_view import scrub, tenant_line
from api.streaming import sse_data
from broker.deployments import DeploymentBus, DeploymentStore
from broker.errors import BrokerUnavailable
from common.models import PACKAGED_MODELS
from common.settings import Settings
from common.tasks import cancel_and_wait
from contracts import ErrorCode
from contracts.accounts import Role
from contracts.deployments import (
    DeployCommand,
    Deployment,
    DeploymentStatus,
    InvalidDeploymentTransition,
    LogLine,
)

log = structlog.get_logger(__name__)

_AGENT_ANSWER_S = 5.0  # an agent answers a deploy command at once (it starts the worker afterwards)
_STOP_WAIT_S = 30.0  # the agent answers a stop once the worker is gone (SIGTERM, then SIGKILL after 10 s)
_STATS_WAIT_S = 2.0
METADATA_EVERY_S = 5.0


class DeploymentError(Exception):
    """A deploy that cannot go ahead, answered in the Aphrodite guide's shape:
    `{"error": {"message": "Deployment failed: …", "type": "deployment_error", "code": <status>}}`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status

    def response(self) -> JSONResponse:
        body = {"error": {"message": f"Deployment failed: {self}", "type": "deployment_error", "code": self.status}}
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True, slots=True)
class Deployments:
    store: DeploymentStore
    bus: DeploymentBus
    policy: DeployPolicy = DeployPolicy(tuple(PACKAGED_MODELS), None)

    @classmethod
    async def open(cls, nc: NatsClient, settings: Settings) -> Deployments:
        store = await DeploymentStore.open(nc.jetstream(), settings.deploy_log_history, settings.nats_replicas)
        return cls(store, DeploymentBus(nc), DeployPolicy.from_settings(settings))


def get_deployments(connection: HTTPConnection) -> Deployments:
    return connection.app.state.deployments


DeploymentsDep = Annotated[Deployments, Depends(get_deployments)]


# --- create, read, stop -----------------------------------------------------------------------------------------


async def deploy(body: DeployRequest, caller: Caller, deployments: Deployments, base_url: str) -> DeployResponse:
    if problem := model_id_problem(body.model_id):
        raise DeploymentError(400, problem)
    if refusal := deployments.policy.refusal(body, caller):
        raise DeploymentError(403, refusal)
    if deployments.policy.over_quota(caller, await deployments.store.list()):
        raise DeploymentError(403, _QUOTA_REACHED.format(deployments.policy.max_per_owner))
    ssh = body.ssh_config.to_contract() if body.ssh_config else None  # exactly one secret, or a 400
    now = time.time()
    record = Deployment(
        id=str(uuid.uuid4()),
        owner=caller.owner,
        model_id=body.model_id,
        user_id=body.user_id,
        api_name=body.api_name,
        created_at=now,
        updated_at=now,
        api_url=base_url,
        ssh_host=ssh.host if ssh else None,
        ssh_username=ssh.username if ssh else None,
        ssh_port=ssh.port if ssh else None,
    )
    await deployments.store.create(record)
    if deployments.policy.over_quota(caller, await deployments.store.list(), record.id):  # lost a race
        await _refused(deployments, record.id, 403, _QUOTA_REACHED.format(deployments.policy.max_per_owner))
    command = DeployCommand(deployment_id=record.id, model_id=record.model_id, ssh=ssh)
    try:
        reply = await deployments.bus.start(command, _AGENT_ANSWER_S)
    except BrokerUnavailable:
        await _refused(deployments, record.id, 503, f"no deployment agent answered within {_AGENT_ANSWER_S:g} s")
    if reply is None:
        await _refused(deployments, record.id, 503, "no deployment agent is running (start one with `inferq agent`)")
    if not reply.ok:
        await _refused(deployments, record.id, 500, f"the agent refused it: {reply.error}")
    log.info(
        "deployment.queued",
        deployment_id=record.id,
        model=record.model_id,
        agent_id=reply.agent_id,
        ssh_host=record.ssh_host,
    )
    return DeployResponse(
        status=DeploymentStatus.QUEUED,
        deployment_id=record.id,
        model_id=record.model_id,
        monitor_url=f"{base_url}/api/v1/deployments/{record.id}/status",
    )


_QUOTA_REACHED = "the deployment quota is reached ({} running); stop one first"


async def _refused(deployments: Deployments, deployment_id: str, status: int, reason: str) -> NoReturn:
    await end_here(deployments, deployment_id, DeploymentStatus.FAILED, reason)
    raise DeploymentError(status, reason)


async def visible_deployment(deployment_id: str, caller: Caller, deployments: Deployments) -> Deployment:
    stored = await deployments.store.get(deployment_id)
    if stored is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"deployment {deployment_id} does not exist", param="deployment_id")
    if caller.role is not Role.MONITOR:
        require_visible(caller, stored.record.owner, f"deployment {deployment_id}")
    return stored.record


def status_for(deployment: Deployment, caller: Caller) -> dict:
    """The status object as `caller` sees it: a failure's reason (the worker's last words) scrubbed for
    non-admins, like the log lines."""
    status = status_object(deployment)
    if caller.role is not Role.ADMIN and status["error"]:
        status["error"] = scrub(status["error"])
    return status


async def list_deployments(caller: Caller, deployments: Deployments) -> dict:
    found = await deployments.store.list()
    if caller.role is not Role.MONITOR:
        found = visible_to(caller, found, lambda deployment: deployment.owner)
    found.sort(key=lambda deployment: deployment.created_at, reverse=True)
    return {"object": "list", "data": [status_for(deployment, caller) for deployment in found]}


async def stop_deployment(deployment_id: str, caller: Caller, deployments: Deployments) -> dict:
    """Stop the worker (the agent answers once it is gone) and return the status; stopping twice is fine."""
    deployment = await visible_deployment(deployment_id, caller, deployments)
    if not deployment.status.terminal:
        try:
            reply = await deployments.bus.stop(deployment_id, _STOP_WAIT_S)
        except BrokerUnavailable:
            reply = None
        if reply is None:  # no agent holds it (never taken, or its agent is gone): the record is all there is
            await end_here(deployments, deployment_id, DeploymentStatus.STOPPED, None)
    return status_for(await visible_deployment(deployment_id, caller, deployments), caller)


async def end_here(deployments: Deployments, deployment_id: str, status: DeploymentStatus, reason: str | None) -> None:
    """Finish a deployment no agent is looking after, including the last log line a log stream ends on."""

    def edit(current: Deployment) -> Deployment | None:
        return None if current.status.terminal else current.transition(status, time.time(), error=reason)

    try:
        stored = await deployments.store.change(deployment_id, edit)
    except InvalidDeploymentTransition:
        return
    if stored is None or stored.record.status is not status or stored.record.error != reason:
        return  # someone else ended it (its agent, just now), and wrote the last line
    content = f"[api] {status}: {reason}" if reason else f"[api] {status}"
    await deployments.bus.publish_log(
        deployment_id, LogLine(timestamp=time.time(), content=content, source="api", final=True)
    )


# --- the log stream ---------------------------------------------------------------------------------------------


def sse_event(event: str, payload: dict) -> str:
    return f"event: {event}\n{sse_data(payload)}"


async def log_stream(
    deployment: Deployment,
    deployments: Deployments,
    *,
    timestamps: bool,
    tenant_view: bool,
    metadata_every_s: float = METADATA_EVERY_S,
) -> AsyncIterator[str]:
    """`deployment_info`, then `metadata` (now and every few seconds) and `log` events: the kept history first,
    then live lines. Ends after the deployment's last line (it failed or was stopped). `tenant_view`: lines as a
    non-admin may see them (api/serving/log_view.py)."""
    bus = deployments.bus
    yield sse_event("deployment_info", deployment_info_event(deployment))
    yield sse_event("metadata", await _metadata(deployment, deployments))
    lines: asyncio.Queue[LogLine] = asyncio.Queue()

    async def follow() -> None:
        async for line in bus.log_lines(deployment.id):
            await lines.put(line)

    follower = asyncio.create_task(follow())
    try:
        next_metadata = time.monotonic() + metadata_every_s
        while True:
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel of a client that left
                async with asyncio.timeout(max(0.0, next_metadata - time.monotonic())):
                    line = await lines.get()
            except TimeoutError:
                next_metadata = time.monotonic() + metadata_every_s
                yield sse_event("metadata", await _metadata(deployment, deployments))
                continue
            content = tenant_line(line.content) if tenant_view else line.content
            if content is not None:
                payload = (
                    {"timestamp": log_time(line.timestamp), "content": content} if timestamps else {"content": content}
                )
                yield sse_event("log", payload)
            if line.final:
                return
    finally:
        await cancel_and_wait(follower)


async def _metadata(deployment: Deployment, deployments: Deployments) -> dict:
    stored = await deployments.store.get(deployment.id)
    current = stored.record if stored else deployment
    stats = None if current.status.terminal else await deployments.bus.stats(deployment.id, _STATS_WAIT_S)
    return metadata_event(current, stats, time.time())
