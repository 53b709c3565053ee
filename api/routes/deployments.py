"""Deployment management (Aphrodite deployment guide): deploy a model to a node agent's machine or over SSH,
watch its status, list, stop, and stream its logs as server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.auth.caller import CallerDep
from api.schemas.deployments import DeployRequest, DeployResponse
from api.schemas.ids import ResourceId
from api.serving import deployments
from api.serving.deployments import DeploymentError, DeploymentsDep
from contracts.accounts import Role

router = APIRouter(tags=["deployments"])

_DEPLOYMENT_ERROR = {
    "description": "The Aphrodite guide's `deployment_error` shape: "
    '`{"error": {"message": "Deployment failed: …", "type": "deployment_error", '
    '"code": <status>}}`'
}


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post(
    "/api/v1/deploy",
    response_model=DeployResponse,
    responses={400: _DEPLOYMENT_ERROR, 500: _DEPLOYMENT_ERROR, 503: _DEPLOYMENT_ERROR},
)
async def deploy(body: DeployRequest, request: Request, services: DeploymentsDep, caller: CallerDep):
    """Queue a deployment: a node agent starts `inferq worker --model <model_id>` on its machine, or on
    `ssh_config.host` over SSH. Poll `monitor_url` for queued → starting → active | failed."""
    try:
        return await deployments.deploy(body, caller, services, _base_url(request))
    except DeploymentError as exc:
        return exc.response()


@router.get("/api/v1/deployments")
async def list_deployments(services: DeploymentsDep, caller: CallerDep) -> dict:
    """The caller's deployments (every deployment for admins and monitors), newest first."""
    return await deployments.list_deployments(caller, services)


@router.get("/api/v1/deployments/{deployment_id}/status")
async def deployment_status(deployment_id: ResourceId, services: DeploymentsDep, caller: CallerDep) -> dict:
    return deployments.status_for(await deployments.visible_deployment(deployment_id, caller, services), caller)


@router.delete("/api/v1/deployments/{deployment_id}")
async def stop_deployment(deployment_id: ResourceId, services: DeploymentsDep, caller: CallerDep) -> dict:
    """Stop the deployment's worker; answers with the status (`stopped`) once it is gone."""
    return await deployments.stop_deployment(deployment_id, caller, services)


@router.get("/api/v1/deployments/{deployment_id}/logs/stream", response_class=StreamingResponse)
async def stream_logs(
    deployment_id: ResourceId, services: DeploymentsDep, caller: CallerDep, timestamps: bool = False
) -> StreamingResponse:
    """Server-sent events: `deployment_info`, `metadata` (every few seconds) and `log` (the last lines kept,
    then live). SSH credentials in the query (as in the Aphrodite guide's example) are not needed and are ignored."""
    deployment = await deployments.visible_deployment(deployment_id, caller, services)
    # Admins see the raw lines; anyone else a tenant view: a worker's output names every owner's requests.
    view = caller.role is not Role.ADMIN
    return StreamingResponse(
        deployments.log_stream(deployment, services, timestamps=timestamps, tenant_view=view),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
