"""Ensuring topology while other processes create the same streams: a stream another process created an instant
ago may be unknown to the node that answers for a moment; that is waited out, not a failed startup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nats.js import errors as jse

from broker.topology import _await_leader

pytestmark = pytest.mark.asyncio


class JustCreatedElsewhere:
    """stream_info: "stream not found" twice (not yet applied on this node), then a replicated stream with a
    leader."""

    def __init__(self) -> None:
        self.calls = 0

    async def stream_info(self, name: str):
        self.calls += 1
        if self.calls <= 2:
            raise jse.NotFoundError(code=404, err_code=10059, description="stream not found")
        return SimpleNamespace(config=SimpleNamespace(num_replicas=3), cluster=SimpleNamespace(leader="n2"))


async def test_a_stream_not_yet_known_to_the_answering_node_is_waited_for() -> None:
    js = JustCreatedElsewhere()
    await _await_leader(js, "KV_files")
    assert js.calls == 3
