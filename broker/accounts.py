"""Users, API keys and login tokens in one JetStream KV bucket, shared by every API replica and the CLI. Records
hold hashes only; hashing and verification live in api/auth. Creating any record also sets a marker that
switches authentication on for `auth=auto` deployments."""

from __future__ import annotations

from typing import TypeVar

from nats.js import JetStreamContext
from nats.js import errors as jse
from nats.js.kv import KeyValue

from broker import kv, subjects
from broker.errors import BrokerError
from broker.topology import ensure_accounts
from contracts import Contract
from contracts.accounts import ApiKeyRecord, LoginTokenRecord, UserRecord

R = TypeVar("R", bound=Contract)


class AccountExists(BrokerError):
    """A user with this email (or a key with this id) already exists."""


class AccountStore:
    def __init__(self, bucket: KeyValue):
        self._kv = bucket

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> AccountStore:
        return cls(await ensure_accounts(js, replicas))

    # --- the auth-enabled marker ------------------------------------------------------------------------------

    async def auth_enabled(self) -> bool:
        return await self._get_raw(subjects.AUTH_MARKER_KEY) is not None

    async def _mark_enabled(self) -> None:
        await self._kv.put(subjects.AUTH_MARKER_KEY, b"1")

    # --- API keys ---------------------------------------------------------------------------------------------

    async def add_key(self, record: ApiKeyRecord) -> None:
        await self._create(subjects.api_key_key(record.key_id), record, f"key {record.key_id}")

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        return await self._get(subjects.api_key_key(key_id), ApiKeyRecord)

    async def list_keys(self) -> list[ApiKeyRecord]:
        return await self._list("key", ApiKeyRecord)

    async def remove_key(self, key_id: str) -> bool:
        return await self._delete(subjects.api_key_key(key_id))

    # --- users ------------------------------------------------------------------------------------------------

    async def add_user(self, record: UserRecord) -> None:
        await self._create(subjects.user_key(record.user_id), record, f"user {record.email}")

    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._get(subjects.user_key(user_id), UserRecord)

    async def list_users(self) -> list[UserRecord]:
        return await self._list("user", UserRecord)

    async def remove_user(self, user_id: str) -> bool:
        await self.revoke_tokens(user_id)
        return await self._delete(subjects.user_key(user_id))

    # --- login tokens -----------------------------------------------------------------------------------------

    async def add_token(self, record: LoginTokenRecord, ttl_s: float) -> None:
        # The per-message TTL only collects expired tokens; validity is checked against expires_at.
        await self._kv.create(
            subjects.login_token_key(record.user_id, record.token_id), record.to_bytes(), msg_ttl=max(1, int(ttl_s))
        )

    async def get_token(self, user_id: str, token_id: str) -> LoginTokenRecord | None:
        return await self._get(subjects.login_token_key(user_id, token_id), LoginTokenRecord)

    async def revoke_token(self, user_id: str, token_id: str) -> bool:
        return await self._delete(subjects.login_token_key(user_id, token_id))

    async def revoke_tokens(self, user_id: str) -> int:
        tokens = await self._list(f"token.{user_id}", LoginTokenRecord)
        for token in tokens:
            await self._delete(subjects.login_token_key(user_id, token.token_id))
        return len(tokens)

    # --- KV plumbing ------------------------------------------------------------------------------------------

    async def _create(self, key: str, record: Contract, what: str) -> None:
        try:
            await self._kv.create(key, record.to_bytes())
        except jse.KeyWrongLastSequenceError:
            raise AccountExists(f"{what} already exists") from None
        await self._mark_enabled()

    async def _get_raw(self, key: str) -> bytes | None:
        found = await kv.read(self._kv, key)
        return None if found is None else found[0]

    async def _get(self, key: str, kind: type[R]) -> R | None:
        raw = await self._get_raw(key)
        return None if raw is None else kind.from_bytes(raw)

    async def _list(self, prefix: str, kind: type[R]) -> list[R]:
        return await kv.records(self._kv, prefix, kind)

    async def _delete(self, key: str) -> bool:
        if await self._get_raw(key) is None:
            return False
        await self._kv.delete(key)
        return True
