"""The account store against a real server: create-once, listing, revocation, and the auth marker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from broker.accounts import AccountExists, AccountStore
from broker.connection import connect
from broker.embedded import EmbeddedNatsServer
from contracts.accounts import ApiKeyRecord, LoginTokenRecord, Role, UserRecord


@pytest.fixture
async def store(server: EmbeddedNatsServer) -> AsyncIterator[AccountStore]:
    async with connect(server.url, "test") as nc:
        yield await AccountStore.open(nc.jetstream())


def user(user_id: str, email: str) -> UserRecord:
    return UserRecord(
        user_id=user_id, email=email, role=Role.CLIENT, password_argon2="$argon2id$x", created_at=time.time()
    )


async def test_empty_store_lists_nothing_and_auth_is_off_until_a_record_exists(store: AccountStore) -> None:
    assert await store.list_users() == [] and await store.list_keys() == []
    assert not await store.auth_enabled()
    await store.add_key(
        ApiKeyRecord(key_id="00aa", name="ci", role=Role.ADMIN, secret_sha256="0" * 64, created_at=time.time())
    )
    assert await store.auth_enabled()
    assert [key.name for key in await store.list_keys()] == ["ci"]
    assert await store.remove_key("00aa") and not await store.remove_key("00aa")
    assert await store.get_key("00aa") is None and await store.list_keys() == []


async def test_users_are_created_once_and_removal_revokes_their_tokens(store: AccountStore) -> None:
    await store.add_user(user("0a", "a@example.org"))
    with pytest.raises(AccountExists):
        await store.add_user(user("0a", "a@example.org"))
    await store.add_user(user("0b", "b@example.org"))
    now = time.time()
    for token_id in ("01", "02"):
        await store.add_token(
            LoginTokenRecord(
                token_id=token_id, user_id="0a", secret_sha256="0" * 64, created_at=now, expires_at=now + 60
            ),
            ttl_s=60,
        )
    assert await store.get_token("0a", "01") is not None
    assert sorted(u.email for u in await store.list_users()) == ["a@example.org", "b@example.org"]
    assert await store.remove_user("0a")
    assert await store.get_token("0a", "01") is None and await store.get_token("0a", "02") is None
    assert [u.email for u in await store.list_users()] == ["b@example.org"]
    await store.add_user(user("0a", "a@example.org"))  # an email can come back after removal
