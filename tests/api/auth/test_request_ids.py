"""Request ids bound to their owner: the one check every resume and attach makes (api/auth/request_ids.py)."""

from __future__ import annotations

import re

from api.auth.request_ids import keyed_request_id, new_request_id, owns, unknown_request
from api.serving.reattach import _REQUEST_ID


def test_an_id_is_owned_by_its_owner_only() -> None:
    request_id = new_request_id("chatcmpl", "key:aaaa")
    assert _REQUEST_ID.fullmatch(request_id)  # the shape Last-Event-ID accepts
    assert owns("key:aaaa", request_id)
    assert not owns("key:bbbb", request_id) and not owns(None, request_id) and not owns("anonymous", request_id)
    assert not owns("key:aaaa", request_id[:-1] + ("0" if request_id[-1] != "0" else "1"))  # a changed tag
    assert not owns("key:aaaa", "chatcmpl-short")
    assert not owns("key:aaaa", new_request_id("chatcmpl", None))  # nobody's: a batch line, a WebSocket


def test_keyed_ids_are_stable_per_owner_and_differ_across_owners() -> None:
    mine = keyed_request_id("cmpl", "order-1", "user:1")
    assert mine == keyed_request_id("cmpl", "order-1", "user:1") and owns("user:1", mine)
    assert keyed_request_id("cmpl", "order-1", "user:2") != mine
    assert keyed_request_id("cmpl", "order-2", "user:1") != mine


def test_someone_elses_id_gets_the_words_of_an_unknown_one() -> None:
    theirs, unknown = new_request_id("cmpl", "key:x"), "cmpl-" + "0" * 32
    refusals = [unknown_request(request_id) for request_id in (theirs, unknown)]
    assert {r.status for r in refusals} == {404}
    assert refusals[0].info.message.replace(theirs, "ID") == refusals[1].info.message.replace(unknown, "ID")
    assert re.search("unknown", refusals[0].info.message)
