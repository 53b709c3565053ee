"""Who is calling. The auth middleware puts a `Caller` on every request and WebSocket (`request.state.caller`);
routes take it as `CallerDep`. Resources a caller creates (batches, files, deployments) store `caller.owner` and
are looked up through `visible_to` / `require_visible`, so another owner gets the same 404 as for an id that
does not exist (never a 403 that would confirm it does)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends
from starlette.requests import HTTPConnection

from api.errors import ApiError
from contracts import ErrorCode
from contracts.accounts import RateLimits, Role

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Caller:
    owner: str  # stable identity stored on owned resources: "key:<id>", "user:<id>", "env:<id>" or "anonymous"
    role: Role
    name: str  # for people and logs: the key's name or the user's email, never a secret
    limits: RateLimits | None = None  # None: unlimited
    token_id: str | None = None  # the login token in use, if any (so it can be revoked)

    def can_see(self, owner: str) -> bool:
        """Admins see everything; everyone else only what they own."""
        return self.role is Role.ADMIN or owner == self.owner


# With authentication off there is one principal, allowed everything (the single-user, loopback start).
ANONYMOUS = Caller(owner="anonymous", role=Role.ADMIN, name="anonymous")


def cache_salt(owner: str) -> str:
    """The prefix-cache partition of `owner`'s requests (`GenerateRequest.cache_salt`): requests of one owner
    reuse each other's prompt KV on a worker, another owner's never (so nobody can time someone else's cache hits,
    vLLM CVE-2025-46570). A digest, so the wire does not name the owner."""
    return hashlib.sha256(f"inferq-prefix-cache\0{owner}".encode()).hexdigest()[:32]


def get_caller(connection: HTTPConnection) -> Caller:
    return getattr(connection.state, "caller", ANONYMOUS)


CallerDep = Annotated[Caller, Depends(get_caller)]


def require_visible(caller: Caller, owner: str, what: str) -> None:
    """Raise the not-found error for a resource `caller` may not see. `what` names it: "batch batch_abc"."""
    if not caller.can_see(owner):
        raise ApiError(ErrorCode.NOT_FOUND, f"{what} does not exist")


def visible_to(caller: Caller, items: list[T], owner_of: Callable[[T], str]) -> list[T]:
    """The items of a listing that `caller` may see; `owner_of(item)` gives an item's owner."""
    return [item for item in items if caller.can_see(owner_of(item))]
