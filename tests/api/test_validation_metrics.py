"""The edge's constraint-validation histogram: every check before queueing is timed (refusals too) and
`GET /metrics` renders it, labelled with the edge id."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.errors import ApiError
from api.serving.metrics import render
from api.structured import StructuredValidation, check_before_queueing
from api.validation_metrics import ValidationMeter
from contracts.constraints import JsonSchemaConstraint, RegexConstraint


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.asyncio
async def test_each_validation_is_timed_and_rendered() -> None:
    meter = ValidationMeter("edge-1")
    validation = StructuredValidation(meter)
    for _ in range(2):  # the second is found among the validated ones: timed too, counted as a hit
        await check_before_queueing(JsonSchemaConstraint(json_schema={"type": "object"}), "response_format", validation)
    with pytest.raises(ApiError):
        await check_before_queueing(RegexConstraint(pattern="(unclosed"), "structured_outputs", validation)
    await check_before_queueing(None, "response_format", validation)  # nothing to validate: not observed
    samples = _samples(render([], [], None, meter).decode())
    edge = {("edge_id", "edge-1")}
    assert samples[("inferq:structured_validation_seconds_count", frozenset(edge))] == 3
    assert 0 < samples[("inferq:structured_validation_seconds_sum", frozenset(edge))] < 5
    assert samples[("inferq:structured_validation_seconds_bucket", frozenset(edge | {("le", "+Inf")}))] == 3
    lookups = "inferq:structured_validation_cache_lookups_total"
    assert samples[(lookups, frozenset(edge | {("result", "hit")}))] == 1
    assert samples[(lookups, frozenset(edge | {("result", "miss")}))] == 2
    assert "structured_validation" not in render([], []).decode()  # another app's scrape does not share it
