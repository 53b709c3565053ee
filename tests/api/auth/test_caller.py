"""Ownership: a caller sees what it owns; admins see everything; others get the not-found error."""

from __future__ import annotations

import pytest

from api.auth.caller import ANONYMOUS, Caller, require_visible, visible_to
from api.errors import ApiError
from contracts.accounts import Role

ALICE = Caller("user:a1", Role.CLIENT, "alice@example.org")
BOB = Caller("key:b2", Role.CLIENT, "bob's key")
ADMIN = Caller("key:c3", Role.ADMIN, "ops")


def test_owners_see_their_own_and_admins_see_all() -> None:
    batches = [{"id": "batch_1", "owner": ALICE.owner}, {"id": "batch_2", "owner": BOB.owner}]
    assert [b["id"] for b in visible_to(ALICE, batches, lambda b: b["owner"])] == ["batch_1"]
    assert [b["id"] for b in visible_to(ADMIN, batches, lambda b: b["owner"])] == ["batch_1", "batch_2"]
    assert len(visible_to(ANONYMOUS, batches, lambda b: b["owner"])) == 2  # auth off: one principal


def test_someone_elses_resource_is_not_found() -> None:
    require_visible(ALICE, ALICE.owner, "batch batch_1")
    with pytest.raises(ApiError) as info:
        require_visible(BOB, ALICE.owner, "batch batch_1")
    assert info.value.status == 404 and "batch batch_1" in info.value.info.message
