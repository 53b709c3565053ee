"""`--structured json`: every request of a level again with the same fixed JSON schema (`response_format:
json_schema`, strict), measured right after the unconstrained level at the same concurrency, so the two share
the machine's state; the report compares throughput and TTFT, and times the edge's schema validation.

The schema is a log record whose `events` array needs more items than any `--output-len` fits, so a constrained
request, like an unconstrained one with `ignore_eos`, generates exactly `--output-len` tokens (it ends `length`,
a valid prefix) and both sides do the same amount of decoding; and it keeps the grammar busy all the way (keys,
enums, integer ranges, bounded strings), not only in a free-text field.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from ops.bench.client import OpenAIStreamTarget
from ops.bench.metrics import LevelResult, Stats
from ops.bench.report import _num, _ratio  # the report's own number formats

STRUCTURED_TARGET = "+json"  # the server measured again with the schema on every request

BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "service": {"type": "string", "maxLength": 32},
        "severity": {"enum": ["debug", "info", "warning", "error"]},
        "events": {
            "type": "array",
            "minItems": 1000,
            "items": {
                "type": "object",
                "properties": {
                    "t": {"type": "integer", "minimum": 0, "maximum": 86400},
                    "kind": {"enum": ["start", "stop", "retry", "timeout"]},
                    "note": {"type": "string", "maxLength": 24},
                },
                "required": ["t", "kind", "note"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["service", "severity", "events"],
    "additionalProperties": False,
}


def response_format(schema: dict[str, Any] = BENCH_SCHEMA) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "bench_log", "schema": schema, "strict": True}}


def large_schema(sections: int = 12) -> dict[str, Any]:
    """A large realistic schema (~20 KiB): an order document with nested objects, arrays, enums, formats,
    patterns, integer and number ranges and anyOf, repeated over `sections` line-item kinds."""
    address = {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 80},
            "city": {"type": "string", "maxLength": 40},
            "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["DE", "FR", "IT", "ES", "NL", "PL", "US", "GB"]},
        },
        "required": ["street", "city", "postcode", "country"],
        "additionalProperties": False,
    }

    def line_item(index: int) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": f"^S{index:02d}-[A-Z0-9]{{6}}$"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                "unit_price": {"type": "number", "minimum": 0},
                "discount": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 1}]},
                "delivery": {"enum": ["standard", "express", "pickup"]},
                "ship_to": address,
                "notes": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 4},
            },
            "required": ["sku", "quantity", "unit_price", "delivery"],
            "additionalProperties": False,
        }

    return {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "format": "uuid"},
            "placed_at": {"type": "string", "format": "date-time"},
            "customer": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 60},
                    "email": {"type": "string", "format": "email"},
                    "billing": address,
                },
                "required": ["name", "email", "billing"],
                "additionalProperties": False,
            },
            **{
                f"items_{index}": {"type": "array", "items": line_item(index), "maxItems": 20}
                for index in range(sections)
            },
            "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
        },
        "required": ["order_id", "customer", "status"],
        "additionalProperties": False,
    }


def structured_target(server: OpenAIStreamTarget) -> OpenAIStreamTarget:
    """The server target with the bench schema on every request."""
    return server.with_body(STRUCTURED_TARGET, {"response_format": response_format()})


def measure_validation(repetitions: int = 200) -> dict[str, Stats]:
    """What the edge's validation (api/structured.py, the same call the edge makes before queueing) costs for the
    bench schema and a large realistic one, measured in this process (idle otherwise): ms per call, wall clock
    and CPU (on a loaded machine the wall time is mostly waiting for a core). Then the large one sent
    `repetitions` times through one `StructuredValidation`, as the edge sees an SDK client repeating its schema
    (the first compiles, the rest find it validated), wall clock per check."""
    from api.structured import StructuredValidation, validate_constraint
    from contracts.constraints import JsonSchemaConstraint

    results = {}
    for name, schema in (("bench schema", BENCH_SCHEMA), ("large schema", large_schema())):
        constraint = JsonSchemaConstraint(json_schema=schema, strict=True)
        wall, cpu = [], []
        for _ in range(repetitions):
            started, started_cpu = time.perf_counter(), time.process_time()
            validate_constraint(constraint, param="response_format")
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        results[f"{name}, wall"] = Stats.of_seconds(wall)
        results[f"{name}, CPU"] = Stats.of_seconds(cpu)

    async def repeated(constraint: JsonSchemaConstraint) -> list[float]:
        validation, wall = StructuredValidation(), []
        for _ in range(repetitions):
            started = time.perf_counter()
            await validation.check([(constraint, "response_format")])
            wall.append(time.perf_counter() - started)
        return wall

    large = JsonSchemaConstraint(json_schema=large_schema(), strict=True)
    results["large schema, repeated"] = Stats.of_seconds(asyncio.run(repeated(large)))
    return results


def structured_comparison(levels: list[LevelResult]) -> list[dict[str, Any]]:
    """Constrained next to unconstrained at each concurrency; tok/s ratio constrained/free (target >= 0.9) and
    TTFT ratio constrained/free (1.0: the constraint costs the first token nothing)."""
    by_key = {(level.target, level.concurrency): level for level in levels}
    rows = []
    for (target, concurrency), constrained in by_key.items():
        free = by_key.get(("inferq", concurrency))
        if target != STRUCTURED_TARGET or free is None:
            continue
        rows.append(
            {
                "concurrency": concurrency,
                "free_output_tok_s": free.output_throughput,
                "json_output_tok_s": constrained.output_throughput,
                "tok_s_ratio_json_over_free": _ratio(constrained.output_throughput, free.output_throughput),
                "free_ttft_p50_ms": free.ttft_ms.p50,
                "json_ttft_p50_ms": constrained.ttft_ms.p50,
                "ttft_p50_ratio_json_over_free": _ratio(constrained.ttft_ms.p50, free.ttft_ms.p50),
            }
        )
    return rows


def schemas() -> str:
    return f"bench schema {len(json.dumps(BENCH_SCHEMA))} B, large schema {len(json.dumps(large_schema()))} B"


def format_structured(rows: list[dict[str, Any]], validation: dict[str, Stats]) -> str:
    if not rows and not validation:
        return ""
    lines = [
        "",
        "json_schema on every request vs unconstrained, same run (tok/s x = json/free, target >= 0.90; "
        "TTFT x = json/free)",
        f"{'conc':>5}{'free tok/s':>12}{'json tok/s':>12}{'tok/s x':>9}{'free TTFT ms':>14}{'json TTFT ms':>14}"
        f"{'TTFT x':>8}",
    ]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>5}{_num(row['free_output_tok_s']):>12}{_num(row['json_output_tok_s']):>12}"
            f"{_num(row['tok_s_ratio_json_over_free'], 2):>9}{_num(row['free_ttft_p50_ms']):>14}"
            f"{_num(row['json_ttft_p50_ms']):>14}{_num(row['ttft_p50_ratio_json_over_free'], 2):>8}"
        )
    if validation:
        lines.append(f"edge schema validation (api/structured.py, in this process; target p99 < 20 ms), {schemas()}")
    for name, stats in validation.items():
        lines.append(f"  {name:<24} p50 {_num(stats.p50, 2):>7} ms   p99 {_num(stats.p99, 2):>7} ms")
    return "\n".join(lines) + "\n"
