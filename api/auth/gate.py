"""The edge's authentication and admission state: whether auth is on, who a bearer credential belongs to, and
the per-owner request budget. Built in `create_app` (no I/O), opened in the lifespan."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import nats.errors
import structlog
from nats.js import JetStreamContext

from api.auth.accounts import Accounts, LoginCaps
from api.auth.caller import ANONYMOUS, Caller
from api.auth.credentials import digest_matches, parse_bearer, sha256_hex
from api.auth.metering import Clock, Meter
from broker.accounts import AccountStore
from broker.errors import BrokerError
from broker.rate_limits import RateLimiter, Verdict
from common.settings import Settings
from contracts.accounts import RateLimits, Role

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EnvKey:
    """An `INFERQ_API_KEYS` entry, kept only as its hash: `KEY` (an admin key) or `ROLE:KEY`."""

    sha256: str = field(repr=False)
    role: Role
    owner: str

    @classmethod
    def parse(cls, entry: str) -> EnvKey:
        prefix, sep, rest = entry.partition(":")
        role, key = (Role(prefix), rest) if sep and prefix in {r.value for r in Role} else (Role.ADMIN, entry)
        # The owner id must not let anyone test guesses of a weak key offline: a salted, truncated digest.
        owner = "env:" + hashlib.sha256(b"inferq-env-key\0" + key.encode()).hexdigest()[:16]
        return cls(sha256_hex(key), role, owner)


def default_limits(settings: Settings) -> RateLimits:
    """The server's limits for credentials without their own; 0 in a setting means unlimited."""
    return RateLimits(
        requests_per_minute=settings.rate_limit_requests_per_minute or None,
        tokens_per_minute=settings.rate_limit_tokens_per_minute or None,
        requests_per_day=settings.rate_limit_requests_per_day or None,
    )


def login_caps(settings: Settings) -> LoginCaps:
    return LoginCaps(
        per_address=settings.login_attempts_per_minute_per_address or None,
        total=settings.login_attempts_per_minute or None,
    )


class AuthGate:
    def __init__(self, settings: Settings, clock: Clock = time.time):
        self.settings = settings
        self.clock = clock
        self.defaults = default_limits(settings)
        self._env_keys = [EnvKey.parse(entry) for entry in settings.api_keys]
        self._enabled = settings.auth == "on" or (settings.auth == "auto" and bool(self._env_keys))
        self._store: AccountStore | None = None
        self._limiter: RateLimiter | None = None
        self._accounts: Accounts | None = None

    async def open(self, js: JetStreamContext) -> None:
        self._store = await AccountStore.open(js, self.settings.nats_replicas)
        self._limiter = await RateLimiter.open(js, self.settings.nats_replicas)
        self._accounts = Accounts(
            self._store,
            self._limiter,
            self.defaults,
            self.settings.login_token_ttl_s,
            clock=lambda: self.clock(),
            login_caps=login_caps(self.settings),
        )
        enabled = await self.enabled()
        log.info("auth.mode", setting=self.settings.auth, enabled=enabled, env_keys=len(self._env_keys))
        if not enabled and self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "auth.off_on_public_address",
                host=self.settings.host,
                hint="create a key (inferq keys create) or set INFERQ_AUTH=on",
            )

    @property
    def accounts(self) -> Accounts:
        assert self._accounts is not None, "AuthGate.open() runs in the lifespan"
        return self._accounts

    @property
    def limiter(self) -> RateLimiter:
        assert self._limiter is not None, "AuthGate.open() runs in the lifespan"
        return self._limiter

    async def enabled(self) -> bool:
        """On by setting or env keys; in `auto`, also from the moment any key or user exists anywhere (a marker
        every replica reads on every request while it is still off, so no replica stays open after another
        created a key)."""
        if self._enabled or self.settings.auth == "off":
            return self._enabled
        assert self._store is not None
        try:
            self._enabled = await self._store.auth_enabled()
        except (BrokerError, nats.errors.Error, TimeoutError) as exc:
            # A NATS node failing over: keys cannot be created meanwhile either, so the last answer stands
            # (once on, a replica never reads the marker again).
            log.warning("auth.marker_unreadable", error=str(exc) or type(exc).__name__)
        return self._enabled

    async def caller_for(self, presented: str | None) -> Caller | None:
        """ANONYMOUS while auth is off (any credential ignored); else the caller, or None if not authenticated."""
        if not await self.enabled():
            return ANONYMOUS
        return await self.authenticate(presented) if presented else None

    async def authenticate(self, presented: str) -> Caller | None:
        bearer = parse_bearer(presented)
        now = self.clock()
        if bearer.kind == "key":
            key = await self.accounts.store.get_key(*bearer.ids)
            if key is not None and digest_matches(bearer.secret, key.secret_sha256):
                return Caller(f"key:{key.key_id}", key.role, key.name, self._limits(key.limits))
        elif bearer.kind == "token":
            user_id, token_id = bearer.ids
            token = await self.accounts.store.get_token(user_id, token_id)
            if token is not None and token.expires_at > now and digest_matches(bearer.secret, token.secret_sha256):
                user = await self.accounts.store.get_user(user_id)  # removed users lose their tokens at once
                if user is not None:
                    return Caller(
                        f"user:{user_id}", user.role, user.email, self._limits(user.limits), token_id=token_id
                    )
        return self._env_caller(presented)

    def _env_caller(self, presented: str) -> Caller | None:
        # Compare against every entry, so the time taken does not tell which (or whether one) matched.
        matches = [key for key in self._env_keys if digest_matches(presented, key.sha256)]
        if not matches:
            return None
        key = matches[0]
        return Caller(key.owner, key.role, f"{key.role.value} key from INFERQ_API_KEYS", self._limits(None))

    def _limits(self, own: RateLimits | None) -> RateLimits | None:
        """A credential's own limits, else the defaults; None when nothing is limited (no counting at all)."""
        limits = own or self.defaults
        return None if limits == RateLimits() else limits

    async def admit(self, caller: Caller) -> Verdict | None:
        """Count one request against the caller's minute and day (None: the caller is unlimited)."""
        if caller.limits is None:
            return None
        return await self.limiter.admit(caller.owner, caller.limits, self.clock(), requests=1)

    def meter_for(self, caller: Caller, verdict: Verdict | None = None, *, strict: bool = True) -> Meter | None:
        if caller.limits is None:
            return None
        return Meter(
            self.limiter,
            caller.owner,
            caller.limits,
            verdict.windows if verdict else None,
            strict=strict,
            clock=self.clock,
        )

    async def meter_for_owner(self, owner: str) -> Meter | None:
        """A charge-only meter for background work done for `owner` (a batch runner has only the owner stored
        with the job): it counts against the owner's token budget and never refuses. None if nothing limits the
        owner (anonymous, unlimited, or no longer existing)."""
        kind, _, ident = owner.partition(":")
        if kind == "key":
            record = await self.accounts.store.get_key(ident)
        elif kind == "user":
            record = await self.accounts.store.get_user(ident)
        else:
            record = None
        if record is None and kind != "env":
            return None
        limits = self._limits(record.limits if record is not None else None)
        return None if limits is None else Meter(self.limiter, owner, limits, strict=False, clock=self.clock)
