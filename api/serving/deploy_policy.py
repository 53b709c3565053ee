"""Who may deploy what. A deployment starts a process on a server's machine (a worker takes gigabytes of memory)
or makes the server open an SSH connection, so only admins choose freely. Everyone else (clients) may deploy
only the models of the catalogue (`INFERQ_DEPLOY_CLIENT_MODELS`, default: the packaged models), never a path or
over SSH, and at most `INFERQ_DEPLOY_MAX_PER_OWNER` deployments at once. A refusal names the rule, never what the
server's filesystem holds: the model id is compared with the catalogue, nothing is looked up."""

from __future__ import annotations

from dataclasses import dataclass

from api.auth.caller import Caller
from api.schemas.deployments import DeployRequest
from common.models import PACKAGED_MODELS
from common.settings import Settings
from contracts.accounts import Role
from contracts.deployments import Deployment


@dataclass(frozen=True, slots=True)
class DeployPolicy:
    client_models: tuple[str, ...]
    max_per_owner: int | None  # None: unlimited

    @classmethod
    def from_settings(cls, settings: Settings) -> DeployPolicy:
        return cls(tuple(settings.deploy_client_models or PACKAGED_MODELS), settings.deploy_max_per_owner or None)

    def refusal(self, body: DeployRequest, caller: Caller) -> str | None:
        """Why `caller` may not make this deployment (None: it may, quota aside)."""
        if caller.role is Role.ADMIN:
            return None
        if body.ssh_config is not None:
            return "only admins may deploy over SSH"
        if body.model_id not in self.client_models:
            return f"clients may deploy only the catalogue's models: {', '.join(self.client_models)}"
        return None

    def over_quota(self, caller: Caller, owned: list[Deployment], deployment_id: str | None = None) -> bool:
        """Whether `caller` is past its quota: with `deployment_id`, whether that one (already stored) is past
        it, counting the owner's running deployments in creation order (so of two made at once on two replicas,
        the later one is refused on both); without, whether a new one would be."""
        if caller.role is Role.ADMIN or self.max_per_owner is None:
            return False
        running = sorted(
            (d for d in owned if d.owner == caller.owner and not d.status.terminal), key=lambda d: (d.created_at, d.id)
        )
        if deployment_id is None:
            return len(running) >= self.max_per_owner
        position = next((i for i, d in enumerate(running) if d.id == deployment_id), len(running))
        return position >= self.max_per_owner
