"""Measure the edge's validation of a structured-output constraint before queueing, the old way against the new,
in one process and one run (issue #16, api/structured.py):

- `compile`: every request compiles its constraint in a worker thread (`check_before_queueing` without the app's
  `StructuredValidation`): what the edge did before it remembered validated constraints;
- `cached`: one `StructuredValidation` for the whole run, as the app holds one: the first request compiles (its
  concurrent companions wait for that one compile), every later one finds the constraint's key.

Each round sends `--concurrency` requests at once, all with the same schema (what an SDK client does), once per
mode, the modes in a shuffled order per round so a machine busier for a while skews both alike. Reported per
mode: the wall time of each request's check from its side (what `inferq:structured_validation_seconds`
measures) over the rounds after the first (p50, p99, max), the first round's slowest, the process CPU per
request, the event loop's worst lag (a 1 ms ticker's overshoot while the checks run: it stays at the machine's
scheduling noise when nothing blocks the loop), and how many checks refused the (valid) schema. On a shared
machine read the ratios.

    PYTHONPATH=$PWD python scripts/structured_edge_validation.py --rounds 20 --concurrency 1,32
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from typing import Any

from api.errors import ApiError
from api.structured import StructuredValidation, check_before_queueing
from contracts.constraints import JsonSchemaConstraint
from ops.bench.structured import BENCH_SCHEMA, large_schema

MODES = ("compile", "cached")
SCHEMAS = {"large": large_schema, "bench": lambda: BENCH_SCHEMA}


async def _loop_lag(stop: asyncio.Event) -> float:
    """The worst overshoot of a 1 ms sleep until `stop`: how long the event loop was kept from running."""
    worst = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
    return worst


async def one_round(
    constraint: JsonSchemaConstraint, concurrency: int, validation: StructuredValidation | None
) -> dict[str, Any]:
    refused = 0

    async def timed() -> float:
        nonlocal refused
        started = time.perf_counter()
        try:
            await check_before_queueing(constraint, "response_format", validation)
        except ApiError:  # a valid schema refused: the compile-time backstop (wall time before 2026-12-07)
            refused += 1
        return time.perf_counter() - started

    stop = asyncio.Event()
    ticker = asyncio.create_task(_loop_lag(stop))
    await asyncio.sleep(0.002)  # the ticker is running before the checks start
    cpu = time.process_time()
    walls = await asyncio.gather(*(timed() for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    stop.set()
    return {"walls": list(walls), "cpu_per_request": cpu / concurrency, "loop_lag": await ticker, "refused": refused}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(schema: str, concurrency: int, rounds: int, rng: random.Random) -> dict[str, dict[str, float]]:
    constraint = JsonSchemaConstraint(json_schema=SCHEMAS[schema](), strict=True)
    await check_before_queueing(constraint, "response_format")  # warm-up: llguidance's JSON compiler, the threads
    cached = StructuredValidation()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in rng.sample(MODES, len(MODES)):
            runs[mode].append(await one_round(constraint, concurrency, cached if mode == "cached" else None))
    summary = {}
    for mode, results in runs.items():
        walls = [wall for result in results[1:] for wall in result["walls"]]
        summary[mode] = {
            "p50_ms": statistics.median(walls) * 1e3,
            "p99_ms": _quantile(walls, 0.99) * 1e3,
            "max_ms": max(walls) * 1e3,
            "first_round_max_ms": max(results[0]["walls"]) * 1e3,
            "cpu_ms_per_request": statistics.median(r["cpu_per_request"] for r in results[1:]) * 1e3,
            "loop_lag_max_ms": max(r["loop_lag"] for r in results) * 1e3,
            "refused": sum(r["refused"] for r in results),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--schema", default="large,bench", help=f"of {', '.join(SCHEMAS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    columns = ("p50_ms", "p99_ms", "max_ms", "first_round_max_ms", "cpu_ms_per_request", "loop_lag_max_ms", "refused")
    sys.stdout.write(f"{'schema':<7}{'conc':>5} {'mode':<8}" + "".join(f"{c:>20}" for c in columns) + "\n")
    for schema in args.schema.split(","):
        for concurrency in (int(part) for part in args.concurrency.split(",")):
            summary = asyncio.run(measure(schema, concurrency, args.rounds, rng))
            for mode in MODES:
                row = summary[mode]
                sys.stdout.write(
                    f"{schema:<7}{concurrency:>5} {mode:<8}" + "".join(f"{row[c]:>20.2f}" for c in columns) + "\n"
                )
            ratios = {c: summary["cached"][c] / summary["compile"][c] for c in ("p50_ms", "p99_ms")}
            sys.stdout.write(
                f"{'':<7}{'':>5} cached/compile: p50 x{ratios['p50_ms']:.4f}  p99 x{ratios['p99_ms']:.4f}\n"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
