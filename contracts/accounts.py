"""Users, API keys, login tokens and rate-limit windows as stored in JetStream KV. Data only: secrets are never
stored, only their hashes (sha256 for random keys and tokens, argon2 for passwords)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from contracts.base import SCHEMA_VERSION, Contract


class Role(StrEnum):
    """Aleph Alpha's role vocabulary; what each may do is in docs/security.md."""

    ADMIN = "admin"
    WORKER = "worker"
    CLIENT = "client"
    MONITOR = "monitor"


class RateLimits(Contract):
    """Per-key budgets; None (absent on the wire) means unlimited in that dimension. The server's defaults
    (Inferneo: 60 requests/min, 150,000 tokens/min, 3,500 requests/day) come from its settings."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    requests_per_day: int | None = Field(default=None, ge=1)


class ApiKeyRecord(Contract):
    v: int = SCHEMA_VERSION
    key_id: str
    name: str
    role: Role
    secret_sha256: str = Field(description="hex sha256 of the secret part; the key itself is shown once")
    limits: RateLimits | None = Field(default=None, description="None: the server's default limits")
    created_at: float


class UserRecord(Contract):
    v: int = SCHEMA_VERSION
    user_id: str = Field(description="derived from the normalised email; KV keys cannot hold '@'")
    email: str
    role: Role
    password_argon2: str
    limits: RateLimits | None = None
    created_at: float


class LoginTokenRecord(Contract):
    v: int = SCHEMA_VERSION
    token_id: str
    user_id: str
    secret_sha256: str
    created_at: float
    expires_at: float


class UsageWindows(Contract):
    """One rate-limit subject's counters in the current minute and UTC day (epoch minute / epoch day numbers)."""

    minute: int = 0
    minute_requests: int = 0
    minute_tokens: int = 0
    day: int = 0
    day_requests: int = 0
