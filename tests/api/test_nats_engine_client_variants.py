"""The NATS engine client's variants: the one a route gets (`charging`) reserves each submission's tokens from
the caller's meter and settles them when the generation ends; the shared client it was made from charges nobody.
NATS itself is faked: this is about who pays, not about the queue."""

from __future__ import annotations

import asyncio

import pytest

from api.auth.metering import Reservation
from api.generation import Timeouts
from api.nats_engine_client import NatsEngineClient
from broker.work_queue import Lane
from contracts import GenerateRequest, SamplingParams

pytestmark = pytest.mark.asyncio


class Connection:
    def jetstream(self) -> object:
        return object()


class Router:
    def __init__(self) -> None:
        self.open_ids: list[str] = []

    def open(self, request_id: str) -> asyncio.Queue:
        self.open_ids.append(request_id)
        return asyncio.Queue()

    def close(self, request_id: str) -> None:
        self.open_ids.remove(request_id)


class QueuedClient(NatsEngineClient):
    """Publishing always succeeds (and is recorded) instead of going to JetStream."""

    published: list[GenerateRequest]

    async def publish(self, request: GenerateRequest) -> bool:
        self.published.append(request)
        return True

    async def cancel(self, request_id: str, attempt: int | None = None) -> None:
        pass


class Meter:
    """Records reservations and their settlements."""

    def __init__(self) -> None:
        self.reserved: list[int] = []
        self.corrections: list[int] = []

    async def reserve(self, tokens: int) -> Reservation:
        self.reserved.append(tokens)
        return Reservation(self, 0, tokens)  # type: ignore[arg-type]

    async def correct(self, minute: int, tokens: int) -> None:
        self.corrections.append(tokens)


def client() -> QueuedClient:
    engine = QueuedClient(Connection(), Router(), Timeouts(queue_s=5, silence_s=5))  # type: ignore[arg-type]
    engine.published = []
    return engine


def request(request_id: str = "r") -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        model="m",
        prompt_token_ids=[1, 2, 3],
        reply_subject="x",
        sampling=SamplingParams(max_tokens=7, n=2),
    )


async def test_the_charging_variant_reserves_from_its_meter_and_settles_on_close() -> None:
    shared, meter = client(), Meter()
    generation = await shared.charging(meter).submit(request())
    assert meter.reserved == [3 + 7 * 2]  # the prompt plus max_tokens per candidate
    await generation.close()  # cut short before any token: charged the prompt only
    assert meter.corrections == [3 - 17]


async def test_the_shared_client_charges_nobody_and_variants_leave_it_unchanged() -> None:
    shared, meter = client(), Meter()
    shared.charging(meter)
    shared.keyed("key").charging(meter)
    generation = await shared.submit(request())
    await generation.close()
    assert meter.reserved == [] and len(shared.published) == 1


async def test_a_batch_lane_variant_keeps_the_charging_of_the_client_it_was_made_from() -> None:
    meter = Meter()
    lines = client().charging(meter).in_lane(Lane.BATCH, Timeouts(queue_s=60, silence_s=5))
    await (await lines.submit(request())).close()
    assert meter.reserved == [17] and lines.published[0].priority > 0  # queued at batch priority
