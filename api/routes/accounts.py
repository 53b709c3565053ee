"""Login (Aleph Alpha's `POST /users/me/token`), logout, and the admin routes for users and API keys. Who may
call what is decided by api/auth/policy.py (`/admin/*`: admin only; login: public)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection, Request

from api.auth.accounts import Accounts, resolve_limits
from api.auth.caller import CallerDep
from api.auth.gate import AuthGate
from api.errors import ApiError
from api.schemas.ids import ResourceId
from contracts import ErrorCode
from contracts.accounts import ApiKeyRecord, Role, UserRecord

router = APIRouter(tags=["accounts"])


def get_accounts(connection: HTTPConnection) -> Accounts:
    return connection.app.state.auth_gate.accounts


AccountsDep = Annotated[Accounts, Depends(get_accounts)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    email: str
    password: str = Field(repr=False)


class NewUser(_Body):
    email: str
    password: str = Field(repr=False)
    role: Role = Role.CLIENT
    limits: dict[str, int | None] | None = Field(
        default=None, description="rate limits over the defaults; null: unlimited in that dimension"
    )


class NewKey(_Body):
    name: str
    role: Role = Role.CLIENT
    limits: dict[str, int | None] | None = None


def user_view(user: UserRecord) -> dict:
    return {
        "object": "user",
        "email": user.email,
        "role": user.role.value,
        "created_at": int(user.created_at),
        "limits": user.limits.model_dump() if user.limits else None,
    }


def key_view(key: ApiKeyRecord) -> dict:
    return {
        "object": "api_key",
        "id": key.key_id,
        "name": key.name,
        "role": key.role.value,
        "created_at": int(key.created_at),
        "limits": key.limits.model_dump() if key.limits else None,
    }


@router.post("/users/me/token")
async def login(body: LoginBody, accounts: AccountsDep, request: Request) -> dict:
    """Email and password → a login token to send as `Authorization: Bearer <token>`, and the user's role."""
    address = request.client.host if request.client else None
    token, user = await accounts.login(body.email, body.password, address)
    return {"token": token, "role": user.role.value}


@router.delete("/users/me/token")
async def logout(caller: CallerDep, accounts: AccountsDep) -> dict:
    """Revoke the login token this request was made with."""
    if caller.token_id is None:
        raise ApiError(ErrorCode.INVALID_REQUEST, "this request was not made with a login token")
    user_id = caller.owner.removeprefix("user:")
    return {"revoked": await accounts.store.revoke_token(user_id, caller.token_id)}


@router.get("/admin/users")
async def list_users(accounts: AccountsDep) -> dict:
    users = sorted(await accounts.store.list_users(), key=lambda user: user.email)
    return {"object": "list", "data": [user_view(user) for user in users]}


@router.post("/admin/users", status_code=201)
async def add_user(body: NewUser, accounts: AccountsDep) -> dict:
    limits = resolve_limits(accounts.defaults, body.limits)
    return user_view(await accounts.add_user(body.email, body.password, body.role, limits))


def _deleted(found: bool, obj: str, **identity: str) -> dict:
    if not found:
        raise ApiError(ErrorCode.NOT_FOUND, f"no {obj.replace('_', ' ')} {next(iter(identity.values()))!r}")
    return {"object": obj, **identity, "deleted": True}


@router.delete("/admin/users/{email}")
async def remove_user(email: str, accounts: AccountsDep) -> dict:
    return _deleted(await accounts.remove_user(email), "user", email=email)


@router.delete("/admin/users/{email}/tokens")
async def revoke_user_tokens(email: str, accounts: AccountsDep) -> dict:
    """Log the user out everywhere."""
    return {"revoked": await accounts.revoke_tokens(email)}


@router.get("/users/me")
async def who_am_i(caller: CallerDep, connection: HTTPConnection) -> dict:
    """The caller's name and role, and whether auth is on (the web console shows the pages that role may use)."""
    gate: AuthGate = connection.app.state.auth_gate
    return {"object": "caller", "name": caller.name, "role": caller.role.value, "auth": await gate.enabled()}


@router.get("/admin/keys")
async def list_keys(accounts: AccountsDep, connection: HTTPConnection) -> dict:
    """Every key, with its effective limits and its use of them in the current minute and UTC day."""
    gate: AuthGate = connection.app.state.auth_gate
    keys = sorted(await accounts.store.list_keys(), key=lambda key: key.created_at)
    now = time.time()
    usages = [await gate.limiter.windows(f"key:{key.key_id}", now) for key in keys]
    return {
        "object": "list",
        "data": [
            {
                **key_view(key),
                "effective_limits": (key.limits or accounts.defaults).model_dump(),
                "usage": {
                    "minute_requests": usage.minute_requests,
                    "minute_tokens": usage.minute_tokens,
                    "day_requests": usage.day_requests,
                },
            }
            for key, usage in zip(keys, usages, strict=True)
        ],
    }


@router.post("/admin/keys", status_code=201)
async def create_key(body: NewKey, accounts: AccountsDep) -> dict:
    """A new API key. The `key` field is the only time the secret is shown."""
    record, key = await accounts.create_key(body.name, body.role, resolve_limits(accounts.defaults, body.limits))
    return {**key_view(record), "key": key}


@router.delete("/admin/keys/{key_id}")
async def revoke_key(key_id: ResourceId, accounts: AccountsDep) -> dict:
    return _deleted(await accounts.revoke_key(key_id), "api_key", id=key_id)
