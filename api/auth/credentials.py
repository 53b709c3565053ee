"""Secrets: making them, hashing them, checking them. Nothing here stores or logs a secret.

API keys and login tokens are random (256 bits), so a sha256 of the secret part is a safe stored form and cheap
enough to check on every request; the id part in front finds the record without a scan. Passwords are chosen by
people, so they get argon2id (slow on purpose) and are checked only at login, off the event loop."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_PREFIX = "iq"
LOGIN_TOKEN_PREFIX = "iqt"
_HEX_ID = re.compile(r"[0-9a-f]{16,64}")
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the email is unknown, so a login takes as long for unknown users as for wrong
    passwords. Made on first use: hashing costs tens of ms and 64 MiB."""
    return _hasher.hash(secrets.token_urlsafe(16))


def new_id() -> str:
    return secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def digest_matches(secret: str, stored_sha256: str) -> bool:
    """Constant-time: the comparison takes as long whichever byte differs."""
    return hmac.compare_digest(sha256_hex(secret).encode(), stored_sha256.encode())


def user_id_for(email: str) -> str:
    return hashlib.sha256(normalise_email(email).encode()).hexdigest()[:32]


def normalise_email(email: str) -> str:
    return email.strip().lower()


@dataclass(frozen=True, slots=True)
class Bearer:
    """A presented credential, split into the ids that locate its record and the secret that proves it."""

    kind: str  # "key", "token", or "opaque" (anything else: maybe an INFERQ_API_KEYS entry)
    ids: tuple[str, ...]
    secret: str = field(repr=False)


def api_key(key_id: str, secret: str) -> str:
    return f"{API_KEY_PREFIX}_{key_id}_{secret}"


def login_token(user_id: str, token_id: str, secret: str) -> str:
    return f"{LOGIN_TOKEN_PREFIX}_{user_id}_{token_id}_{secret}"


def parse_bearer(value: str) -> Bearer:
    """`iq_<key id>_<secret>` or `iqt_<user id>_<token id>_<secret>`; the ids are hex, the secret may hold `_`."""
    parts = value.split("_", 3)
    if parts[0] == API_KEY_PREFIX and len(parts) >= 3 and _HEX_ID.fullmatch(parts[1]):
        return Bearer("key", (parts[1],), "_".join(parts[2:]))
    if (
        parts[0] == LOGIN_TOKEN_PREFIX
        and len(parts) == 4
        and _HEX_ID.fullmatch(parts[1])
        and _HEX_ID.fullmatch(parts[2])
    ):
        return Bearer("token", (parts[1], parts[2]), parts[3])
    return Bearer("opaque", (), value)


def bearer_from_header(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def credential_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The secret a request presents: `Authorization: Bearer <secret>`, or `x-api-key: <secret>` (what the
    Anthropic SDKs send). Bearer wins when both are present."""
    return bearer_from_header(authorization) or (api_key.strip() if api_key else None) or None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


async def verify_password(password: str, stored: str | None) -> bool:
    """argon2 verify in a thread (tens of ms of CPU); `stored=None` burns the same time and fails."""

    def verify() -> bool:
        try:
            return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)
