"""Request ids that name their owner. A request a client may get back later (an SSE stream resumed with
Last-Event-ID, a POST retried with an Idempotency-Key) has an id `<prefix>-<16 hex nonce><16 hex tag>`, where the
tag is a digest of the owner and the nonce. `owns(owner, request_id)` recomputes it: the one check every route
that resumes or attaches a request makes before it follows the request's token journal, so nobody follows
another owner's request. No state: any replica checks any id, and an id's owner cannot be changed without
changing the id (and so the journal it names).

The tag is not a secret and needs none: it binds the id to the *authenticated* caller's owner, which a caller
cannot choose. An id that fails the check gets exactly the answer of an id that never existed
(`unknown_request`), so it does not even confirm the id is real."""

from __future__ import annotations

import hashlib
import secrets

from api.errors import ApiError
from contracts import ErrorCode

_NONCE_HEX = 16
_TAG_HEX = 16


def _tag(owner: str | None, nonce: str) -> str:
    return hashlib.sha256(f"inferq-request-owner\0{owner or ''}\0{nonce}".encode()).hexdigest()[:_TAG_HEX]


def new_request_id(prefix: str, owner: str | None) -> str:
    """A fresh id for `owner`'s request (`owner=None`: nobody's, so nobody can resume it)."""
    nonce = secrets.token_hex(_NONCE_HEX // 2)
    return f"{prefix}-{nonce}{_tag(owner, nonce)}"


def keyed_request_id(prefix: str, key: str, owner: str | None) -> str:
    """The id of the request `owner` names with a client key (Idempotency-Key, X-Request-Id): the same key gives
    the same id for the same owner, another owner's same key gives another id."""
    nonce = hashlib.sha256(f"{owner or ''}\0{key}".encode()).hexdigest()[:_NONCE_HEX]
    return f"{prefix}-{nonce}{_tag(owner, nonce)}"


def owns(owner: str | None, request_id: str) -> bool:
    """Whether `request_id` (`<prefix>-<32 hex>`) is one of `owner`'s."""
    _, _, digits = request_id.rpartition("-")
    if len(digits) != _NONCE_HEX + _TAG_HEX:
        return False
    nonce, tag = digits[:_NONCE_HEX], digits[_NONCE_HEX:]
    return secrets.compare_digest(tag, _tag(owner, nonce))


def unknown_request(request_id: str) -> ApiError:
    """The answer for a request that cannot be followed: unknown, expired, or someone else's (the same words)."""
    return ApiError(
        ErrorCode.NOT_FOUND,
        f"no request {request_id!r} to resume: it is unknown, or finished too long ago to be replayed",
    )
