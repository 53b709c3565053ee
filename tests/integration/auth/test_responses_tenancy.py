"""Stored responses belong to their creator: another owner gets, on either replica, exactly the answer for an
id that never existed (retrieve, input_items, delete, cancel, stream, and as previous_response_id)."""

from __future__ import annotations

import httpx
import pytest

from contracts.accounts import Role
from tests.integration.auth.conftest import headers
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
UNKNOWN = "resp_0123456789abcdef0123456789abcdef"


def _shape(answer: httpx.Response, response_id: str) -> tuple[int, dict]:
    body = answer.json()
    body["error"]["message"] = body["error"]["message"].replace(response_id, "<id>")
    return answer.status_code, body


async def test_another_owners_response_is_unknown_to_them(replicas, make_key, now) -> None:
    owner, other = await make_key(Role.CLIENT), await make_key(Role.CLIENT)
    first, second = replicas
    async with httpx.AsyncClient(base_url=first.base_url, timeout=60) as http:
        created = await http.post(
            "/v1/responses",
            headers=headers(owner),
            json={
                "model": TINY_MODEL_NAME,
                "input": "the vault code is 4471",
                "max_output_tokens": 4,
                "background": True,
            },
        )
        assert created.status_code == 200, created.text
        response_id = created.json()["id"]
    async with httpx.AsyncClient(base_url=second.base_url, timeout=60) as http:
        # The owner reaches it from the other replica.
        assert (await http.get(f"/v1/responses/{response_id}", headers=headers(owner))).status_code == 200
        attempts = {
            "retrieve": lambda rid: http.get(f"/v1/responses/{rid}", headers=headers(other)),
            "input_items": lambda rid: http.get(f"/v1/responses/{rid}/input_items", headers=headers(other)),
            "stream": lambda rid: http.get(f"/v1/responses/{rid}", params={"stream": "true"}, headers=headers(other)),
            "cancel": lambda rid: http.post(f"/v1/responses/{rid}/cancel", headers=headers(other)),
            "delete": lambda rid: http.delete(f"/v1/responses/{rid}", headers=headers(other)),
            "previous_response_id": lambda rid: http.post(
                "/v1/responses",
                headers=headers(other),
                json={"model": TINY_MODEL_NAME, "input": "and?", "previous_response_id": rid},
            ),
        }
        for name, attempt in attempts.items():
            theirs, unknown = await attempt(response_id), await attempt(UNKNOWN)
            assert theirs.status_code == 404, (name, theirs.text)
            assert _shape(theirs, response_id) == _shape(unknown, UNKNOWN), name
        # Nothing the other owner did touched it.
        still = await http.get(f"/v1/responses/{response_id}", headers=headers(owner))
        assert still.status_code == 200 and still.json()["status"] != "cancelled"
