"""`inferq bench --structured json` against a fake OpenAI server: each level is measured unconstrained, then again
with the fixed schema on every request, and the report pairs them and times the edge's schema validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.structured import validate_constraint
from contracts.constraints import JsonSchemaConstraint
from ops.bench.structured import BENCH_SCHEMA, STRUCTURED_TARGET, large_schema, response_format
from tests.ops.test_bench import FakeOpenAI, _run, serve


def test_each_level_runs_again_with_the_schema_and_is_compared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeOpenAI()
    with serve(fake) as url:
        argv = ["--base-url", url, "--concurrency", "1,2", "--num-requests", "3", "--input-len", "8"]
        code, report = _run([*argv, "--output-len", "4", "--structured", "json"], tmp_path)
    assert code == 0 and report is not None
    # warm-up, then per level: 3 unconstrained, then the same 3 prompts constrained
    assert len(fake.requests) == 1 + 2 * (3 + 3)
    for start in (1, 7):
        free, constrained = fake.requests[start : start + 3], fake.requests[start + 3 : start + 6]
        assert all("response_format" not in body for body in free)
        assert all(body["response_format"] == response_format() for body in constrained)
        # The same prompts (at concurrency 2 two requests race to the server, so their order may differ).
        assert sorted(b["prompt"] for b in free) == sorted(b["prompt"] for b in constrained)
    targets = [(level["target"], level["concurrency"]) for level in report["levels"]]
    assert targets == [("inferq", 1), (STRUCTURED_TARGET, 1), ("inferq", 2), (STRUCTURED_TARGET, 2)]
    rows = report["structured"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:
        assert row["tok_s_ratio_json_over_free"] == pytest.approx(row["json_output_tok_s"] / row["free_output_tok_s"])
    validation = report["edge_validation_ms"]
    assert set(validation) == {
        "bench schema, wall",
        "bench schema, CPU",
        "large schema, wall",
        "large schema, CPU",
        "large schema, repeated",
    }
    assert all(0 < stats["p50"] <= stats["p99"] for stats in validation.values())
    # Repeated through the edge's StructuredValidation, the schema is compiled once: the median check is a lookup.
    assert validation["large schema, repeated"]["p50"] < validation["large schema, wall"]["p50"]
    out = capsys.readouterr().out
    assert "json_schema on every request vs unconstrained" in out and "edge schema validation" in out


def test_without_the_flag_nothing_is_constrained(tmp_path: Path) -> None:
    fake = FakeOpenAI()
    with serve(fake) as url:
        code, report = _run(
            ["--base-url", url, "--concurrency", "1", "--num-requests", "2", "--output-len", "2"], tmp_path
        )
    assert code == 0 and report is not None
    assert all("response_format" not in body for body in fake.requests)
    assert report["structured"] == [] and report["edge_validation_ms"] == {}


def test_the_bench_schemas_are_accepted_by_the_edge_and_force_a_long_output() -> None:
    for schema in (BENCH_SCHEMA, large_schema()):
        validate_constraint(JsonSchemaConstraint(json_schema=schema, strict=True), param="response_format")
    # More events than any output length fits: a constrained request runs to max_tokens like an ignore_eos one.
    assert BENCH_SCHEMA["properties"]["events"]["minItems"] >= 1000
    assert len(json.dumps(large_schema())) > 10_000
