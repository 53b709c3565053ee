"""Managing users, API keys and login tokens: the operations behind the admin routes and `inferq users|keys`,
so both do exactly the same thing. Secrets are returned to the caller once and never stored or logged."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import structlog

from api.auth.credentials import (
    api_key,
    hash_password,
    login_token,
    new_id,
    new_secret,
    normalise_email,
    sha256_hex,
    user_id_for,
    verify_password,
)
from api.auth.metering import Clock, rate_limited
from api.errors import ApiError
from broker.accounts import AccountExists, AccountStore
from broker.rate_limits import RateLimiter
from contracts import ErrorCode
from contracts.accounts import ApiKeyRecord, LoginTokenRecord, RateLimits, Role, UserRecord

log = structlog.get_logger(__name__)

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
MIN_PASSWORD_LENGTH = 8
# Login attempts per email and minute: argon2 already makes each guess slow; this caps the guesses.
LOGIN_LIMITS = RateLimits(requests_per_minute=10)


@dataclass(frozen=True, slots=True)
class LoginCaps:
    """Login attempts per minute from one client address and in all (None: unlimited). Every attempt costs an
    argon2 verify (tens of ms of CPU, 64 MiB), unknown emails included, so the public login route needs caps
    that do not depend on the email: these bound its CPU and memory whatever names an attacker makes up."""

    per_address: int | None = 30
    total: int | None = 120


def resolve_limits(defaults: RateLimits, given: Mapping[str, int | None] | None) -> RateLimits | None:
    """None: follow the server's defaults; otherwise the given fields (null = unlimited) over the defaults."""
    if given is None:
        return None
    return RateLimits.model_validate({**defaults.model_dump(), **given})


class Accounts:
    def __init__(
        self,
        store: AccountStore,
        limiter: RateLimiter,
        defaults: RateLimits,
        token_ttl_s: float,
        clock: Clock = time.time,
        login_caps: LoginCaps = LoginCaps(),
    ):
        self.store = store
        self._limiter = limiter
        self.defaults = defaults
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self._login_caps = login_caps

    # --- API keys -------------------------------------------------------------------------------------------

    async def create_key(self, name: str, role: Role, limits: RateLimits | None = None) -> tuple[ApiKeyRecord, str]:
        """A new key; the returned secret is the only copy."""
        if not name.strip():
            raise ApiError(ErrorCode.INVALID_REQUEST, "a key needs a name", param="name")
        secret = new_secret()
        record = ApiKeyRecord(
            key_id=new_id(),
            name=name.strip(),
            role=role,
            secret_sha256=sha256_hex(secret),
            limits=limits,
            created_at=self._clock(),
        )
        await self._created(self.store.add_key(record))
        log.info("accounts.key_created", key_id=record.key_id, name=record.name, role=role.value)
        return record, api_key(record.key_id, secret)

    @staticmethod
    async def _created(creation: Awaitable[None]) -> None:
        try:
            await creation
        except AccountExists as exc:
            raise ApiError(ErrorCode.ALREADY_EXISTS, str(exc)) from None

    async def revoke_key(self, key_id: str) -> bool:
        removed = await self.store.remove_key(key_id)
        log.info("accounts.key_revoked", key_id=key_id, existed=removed)
        return removed

    # --- users ----------------------------------------------------------------------------------------------

    async def add_user(self, email: str, password: str, role: Role, limits: RateLimits | None = None) -> UserRecord:
        email = normalise_email(email)
        if not _EMAIL.fullmatch(email):
            raise ApiError(ErrorCode.INVALID_REQUEST, "not an email address", param="email")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ApiError(
                ErrorCode.INVALID_REQUEST,
                f"the password needs at least {MIN_PASSWORD_LENGTH} characters",
                param="password",
            )
        record = UserRecord(
            user_id=user_id_for(email),
            email=email,
            role=role,
            password_argon2=hash_password(password),
            limits=limits,
            created_at=self._clock(),
        )
        await self._created(self.store.add_user(record))
        log.info("accounts.user_added", email=email, role=role.value)
        return record

    async def remove_user(self, email: str) -> bool:
        removed = await self.store.remove_user(user_id_for(email))
        log.info("accounts.user_removed", email=normalise_email(email), existed=removed)
        return removed

    async def revoke_tokens(self, email: str) -> int:
        return await self.store.revoke_tokens(user_id_for(email))

    # --- login tokens ---------------------------------------------------------------------------------------

    async def login(self, email: str, password: str, address: str | None = None) -> tuple[str, UserRecord]:
        """A new login token for the user, or 401 (the same answer for an unknown email and a wrong password).
        `address`: the client's, for the per-address cap (None: not over HTTP, e.g. a test or tool)."""
        user_id = user_id_for(email)
        caps = self._login_caps
        # Cheapest refusals first, and every one before the argon2 verify. Entries named by what a caller chose
        # (its address, an email that may not exist) expire with their minute: nothing is left behind, and a
        # known and an unknown email are counted (and refused) alike, so a 429 does not reveal an account.
        if address is not None:
            await self._admit(f"login-address:{address_key(address)}", caps.per_address)
        await self._admit("login-all:all", caps.total, minute_only=False)
        await self._admit(f"login:{user_id}", LOGIN_LIMITS.requests_per_minute)
        user = await self.store.get_user(user_id)
        if not await verify_password(password, user.password_argon2 if user else None) or user is None:
            log.info("accounts.login_failed", email=normalise_email(email))
            raise ApiError(ErrorCode.UNAUTHENTICATED, "wrong email or password")
        secret, now = new_secret(), self._clock()
        record = LoginTokenRecord(
            token_id=new_id(),
            user_id=user_id,
            secret_sha256=sha256_hex(secret),
            created_at=now,
            expires_at=now + self._token_ttl_s,
        )
        await self.store.add_token(record, self._token_ttl_s)
        log.info("accounts.login", email=user.email, token_id=record.token_id)
        return login_token(user_id, record.token_id, secret), user

    async def _admit(self, name: str, per_minute: int | None, *, minute_only: bool = True) -> None:
        if per_minute is None:
            return
        verdict = await self._limiter.admit(
            name, RateLimits(requests_per_minute=per_minute), self._clock(), requests=1, minute_only=minute_only
        )
        if not verdict.allowed:
            raise rate_limited(verdict)


def address_key(address: str) -> str:
    """The unit one client controls: an IPv4 address, or an IPv6 /64 (a host is usually given a whole /64, so
    per-address counting of IPv6 would be no cap at all). Anything else (a unix socket) as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False).network_address)
    return str(ip)
