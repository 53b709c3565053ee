"""The edge's validation before queueing (api/structured.py `StructuredValidation`): off the event loop, paid once
per distinct constraint (SDKs repeat their schema and tools on every request), shared by concurrent requests for
the same constraint, refusals never remembered and always named after the request's own field.

The seam: `api.structured.validate_constraint`, wrapped to count compiles and record their thread (and, where a
test needs a validation to stay in flight, to wait for the test)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from api import structured
from api.errors import ApiError
from api.structured import StructuredValidation, check_before_queueing
from api.tools.plan import plan_tools
from api.validation_metrics import ValidationMeter
from contracts.constraints import JsonSchemaConstraint, RegexConstraint
from ops.bench.structured import large_schema
from tests.api.tools.test_tools import TIME, WEATHER

LARGE = JsonSchemaConstraint(json_schema=large_schema(), strict=True)
WAIT_S = 30.0


class Compiles:
    """Counts the real validations and where they ran; `gate` (when set) holds each until it is released."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.gate: threading.Event | None = None
        self.original = structured.validate_constraint

    def __call__(self, constraint, **kwargs) -> None:
        self.threads.append(threading.get_ident())
        if self.gate is not None:
            self.gate.wait(timeout=WAIT_S)
        self.original(constraint, **kwargs)

    @property
    def count(self) -> int:
        return len(self.threads)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Compiles:
    counter = Compiles()
    monkeypatch.setattr(structured, "validate_constraint", counter)
    return counter


async def test_a_schema_sent_on_every_request_is_compiled_once_off_the_event_loop(compiles: Compiles) -> None:
    meter = ValidationMeter("edge-1")
    validation = StructuredValidation(meter)
    for _ in range(5):
        await check_before_queueing(LARGE, "response_format", validation)
    assert compiles.count == 1 and compiles.threads[0] != threading.get_ident()  # a worker thread, not the loop
    assert (meter.hits, meter.misses) == (4, 1)
    # Another object with equal content is the same constraint; a different one is compiled.
    await check_before_queueing(JsonSchemaConstraint(json_schema=large_schema(), strict=True), "x", validation)
    await check_before_queueing(JsonSchemaConstraint(json_schema=large_schema(), strict=False), "x", validation)
    assert compiles.count == 2
    # Without the app's validation (a bare call), nothing is remembered: the old behaviour, compiled each time.
    await check_before_queueing(LARGE, "response_format")
    await check_before_queueing(LARGE, "response_format")
    assert compiles.count == 4


async def test_concurrent_requests_for_one_schema_share_one_compile(compiles: Compiles) -> None:
    validation = StructuredValidation()
    compiles.gate = threading.Event()
    checks = [asyncio.create_task(validation.check([(LARGE, "response_format")])) for _ in range(8)]
    await asyncio.sleep(0.05)
    assert not any(check.done() for check in checks)  # all waiting for the one compile in flight
    compiles.gate.set()
    await asyncio.wait_for(asyncio.gather(*checks), WAIT_S)
    assert compiles.count == 1


async def test_a_client_that_leaves_does_not_cancel_what_others_wait_for(compiles: Compiles) -> None:
    validation = StructuredValidation()
    compiles.gate = threading.Event()
    first = asyncio.create_task(validation.check([(LARGE, "response_format")]))
    second = asyncio.create_task(validation.check([(LARGE, "response_format")]))
    await asyncio.sleep(0.05)
    first.cancel()
    compiles.gate.set()
    await asyncio.wait_for(second, WAIT_S)
    await validation.check([(LARGE, "response_format")])  # remembered, though its first asker went away
    assert first.cancelled() and compiles.count == 1


async def test_a_refusal_is_not_remembered_and_names_each_requests_own_field(compiles: Compiles) -> None:
    validation = StructuredValidation()
    bad = RegexConstraint(pattern="(unclosed")
    compiles.gate = threading.Event()
    checks = [
        asyncio.create_task(validation.check([(bad, param)]))
        for param in ("structured_outputs", "response_format", "structured_outputs")
    ]
    await asyncio.sleep(0.05)
    compiles.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), WAIT_S)
    assert all(isinstance(result, ApiError) and result.status == 400 for result in results)
    assert [result.info.param for result in results] == ["structured_outputs", "response_format", "structured_outputs"]
    assert compiles.count == 2  # one shared compile, and the other field's own message
    with pytest.raises(ApiError):
        await validation.check([(bad, "structured_outputs")])
    assert compiles.count == 3


async def test_the_remembered_constraints_are_a_bounded_lru(compiles: Compiles) -> None:
    validation = StructuredValidation(cache_size=2)
    a, b, c = (RegexConstraint(pattern=p) for p in ("a+", "b+", "c+"))
    for constraint in (a, b, a, c):  # c evicts b, the least recently used
        await validation.check([(constraint, "response_format")])
    assert compiles.count == 3
    await validation.check([(a, "response_format")])
    assert compiles.count == 3
    await validation.check([(b, "response_format")])
    assert compiles.count == 4


async def test_an_agent_sending_the_same_tools_every_turn_pays_once(compiles: Compiles) -> None:
    validation = StructuredValidation()
    for _turn in range(3):
        await plan_tools([WEATHER, TIME], "required", chat_template=None).check(validation)
    assert compiles.count == 3  # two tool schemas and the forced call envelope, on the first turn only


def test_time_spent_waiting_for_a_core_is_not_compile_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 0.5 s backstop counts the validating thread's CPU: on a loaded machine 32 concurrent validations of a
    valid 12 KiB schema each took over 0.5 s of wall time, waiting; that must not make the schema a 400. The
    seam: the grammar translation sleeps (wall time passes, no CPU is spent)."""
    translate = structured.grammar_for

    def waiting_for_a_core(constraint):
        time.sleep(structured.MAX_COMPILE_SECONDS + 0.1)
        return translate(constraint)

    monkeypatch.setattr(structured, "grammar_for", waiting_for_a_core)
    structured.validate_constraint(LARGE, param="response_format")
