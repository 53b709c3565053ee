"""A worker's pull that keeps failing (chaos seed 22: after NATS node kills a never-killed worker logged only
`intake.fetch_failed` ServiceUnavailable while alive) re-binds its subscription instead of repeating it forever."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from nats.js import errors as jse

from broker import work_queue
from broker.work_queue import RequestIntake
from contracts import GenerateRequest, SamplingParams

pytestmark = pytest.mark.asyncio
MODEL = "rebind"


class _Subscription:
    def __init__(self, broken: bool):
        self.broken = broken
        self.unsubscribed = False

    async def fetch(self, batch: int, timeout: float) -> list:
        if self.broken:  # what nats-py raises for a 503 status on the pull request
            raise jse.ServiceUnavailableError()
        request = GenerateRequest(
            request_id="r1",
            model=MODEL,
            prompt_token_ids=[1],
            reply_subject="inf.live.e.r1",
            sampling=SamplingParams(max_tokens=1),
        )
        return [SimpleNamespace(data=request.to_bytes(), metadata=SimpleNamespace(num_delivered=1))]  # a first delivery

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class _JetStream:
    """Binds hand out a broken subscription first (the one that went bad in the node kills), then good ones."""

    def __init__(self):
        self.bound: list[_Subscription] = []

    async def pull_subscribe_bind(self, durable: str, stream: str) -> _Subscription:
        self.bound.append(_Subscription(broken=len(self.bound) < 2))  # one per lane at start
        return self.bound[-1]


async def test_a_pull_failing_for_long_re_binds_and_takes_work_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(work_queue, "_REBIND_AFTER_S", 0.5, raising=False)
    js = _JetStream()
    intake = RequestIntake(js, MODEL)
    await intake.start()
    deadline = time.monotonic() + 10.0
    while not (deliveries := await intake.fetch(4, timeout=0.05)):
        assert time.monotonic() < deadline, "the intake kept pulling on the failing subscription"
        await asyncio.sleep(0.01)
    assert [d.request.request_id for d in deliveries] == ["r1"]
    assert js.bound[0].unsubscribed  # the failing subscription was let go


async def test_a_short_election_does_not_re_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    js = _JetStream()
    intake = RequestIntake(js, MODEL)
    await intake.start()
    for _ in range(3):  # a few 503s, well inside the re-bind period
        assert await intake.fetch(4, timeout=0.05) == []
    assert len(js.bound) == 2
