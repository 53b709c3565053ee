"""The plain-text result table, the inferq-vs-baseline comparison, and the JSON file."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.bench.background import BatchProgress
from ops.bench.config import BenchConfig
from ops.bench.memory import MemoryReport
from ops.bench.metrics import LevelResult, Stats

BUSY_TARGET = "+batch"  # the server measured again while a background batch runs


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What was measured, for the table's heading and the JSON."""

    model: str | None
    endpoint: str | None
    prompt_source: str
    baseline: str | None
    memory: MemoryReport | None = None  # the server's RSS during the run (ops/bench/memory.py)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f}"


def _tokens(value: float | None) -> str:
    return "-" if value is None else f"{round(value, 1):g}"  # 64.0 -> "64", 80.25 -> "80.2"


def _in_out(level: LevelResult) -> str:
    return f"{_tokens(level.mean_prompt_tokens)}/{_tokens(level.mean_output_tokens)}"


# (heading, width, cell) for each column of the result table.
_COLUMNS: list[tuple[str, int, Callable[[LevelResult], str]]] = [
    ("target", 9, lambda r: r.target),
    ("conc", 6, lambda r: str(r.concurrency)),
    ("reqs", 6, lambda r: str(r.num_requests)),
    ("err", 5, lambda r: str(r.errors)),
    ("in/out tok", 12, _in_out),
    ("req/s", 8, lambda r: _num(r.request_throughput, 2)),
    ("out tok/s", 11, lambda r: _num(r.output_throughput)),
    ("TTFT p50 ms", 12, lambda r: _num(r.ttft_ms.p50)),
    ("TTFT p99 ms", 12, lambda r: _num(r.ttft_ms.p99)),
    ("ITL p50 ms", 11, lambda r: _num(r.itl_ms.p50)),
    ("ITL p99 ms", 11, lambda r: _num(r.itl_ms.p99)),
    ("E2E p50 s", 10, lambda r: _seconds(r.e2e_ms.p50)),
    ("E2E p99 s", 10, lambda r: _seconds(r.e2e_ms.p99)),
]


# With --observe-nats: what the edge adds per token (token event on NATS -> SSE chunk at the client).
_EDGE_COLUMN = (
    "edge p50/p99 ms",
    17,
    lambda r: "-" if r.edge_ms is None else f"{_num(r.edge_ms.p50)}/{_num(r.edge_ms.p99)}",
)


def _acceptance(level: LevelResult) -> str:
    if not level.draft_tokens or level.accepted_draft_tokens is None:
        return "-"
    return f"{level.accepted_draft_tokens / level.draft_tokens:.0%} of {level.draft_tokens}"


# When the server reports speculative decoding: the share of draft tokens accepted during the level.
_DRAFTS_COLUMN = ("drafts accepted", 17, _acceptance)


def _row(columns: list, cells: list[str]) -> str:
    first, *rest = cells
    widths = [width for _, width, _ in columns]
    return f"{first:<{widths[0]}}" + "".join(f"{cell:>{w}}" for cell, w in zip(rest, widths[1:], strict=True))


def format_table(cfg: BenchConfig, info: RunInfo, levels: list[LevelResult]) -> str:
    heading = [
        f"inferq bench: input {cfg.input_len} tokens, output {cfg.output_len} tokens (ignore_eos), "
        f"{f'temperature {cfg.temperature:g}' if cfg.temperature > 0 else 'greedy'}, warm-up {cfg.warmup}",
    ]
    if info.model is not None:
        heading.append(f"  inferq:   {info.model} at {cfg.base_url}{info.endpoint}; prompts as {info.prompt_source}")
    if info.baseline is not None:
        heading.append(f"  baseline: transformers generate(), one request at a time, {info.baseline}")
    if cfg.background_batch:
        heading.append(
            f"  {BUSY_TARGET}:   inferq again, while a /v1/batches job of {cfg.background_batch} lines "
            "(same prompt and output lengths) runs"
        )
    columns = _COLUMNS + ([_EDGE_COLUMN] if any(level.edge_ms is not None for level in levels) else [])
    columns += [_DRAFTS_COLUMN] if any(level.draft_tokens for level in levels) else []
    lines = [*heading, "", _row(columns, [name for name, _, _ in columns])]
    lines += [_row(columns, [cell(level) for _, _, cell in columns]) for level in levels]
    return "\n".join(lines) + "\n"


def comparison(levels: list[LevelResult]) -> list[dict[str, Any]]:
    """inferq next to the baseline at each concurrency both ran; both ratios are > 1 when inferq is better.
    Each inferq level pairs with the baseline level measured after it (a repeated concurrency gets a row each)."""
    waiting: dict[int, LevelResult] = {}  # inferq levels whose baseline is still to come, by concurrency
    rows = []
    for level in levels:
        if level.target == "inferq":
            waiting[level.concurrency] = level
        elif level.target == "baseline" and (ours := waiting.pop(level.concurrency, None)) is not None:
            rows.append(_comparison_row(ours, level))
    return rows


def _comparison_row(ours: LevelResult, base: LevelResult) -> dict[str, Any]:
    return {
        "concurrency": ours.concurrency,
        "inferq_output_tok_s": ours.output_throughput,
        "baseline_output_tok_s": base.output_throughput,
        "tok_s_ratio_inferq_over_baseline": _ratio(ours.output_throughput, base.output_throughput),
        "inferq_ttft_p50_ms": ours.ttft_ms.p50,
        "baseline_ttft_p50_ms": base.ttft_ms.p50,
        "ttft_p50_ratio_baseline_over_inferq": _ratio(base.ttft_ms.p50, ours.ttft_ms.p50),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def batch_comparison(levels: list[LevelResult], batches: dict[int, BatchProgress]) -> list[dict[str, Any]]:
    """Interactive traffic with a batch running next to the same traffic idle, per concurrency; the TTFT ratio
    is busy/idle (1.0: the batch costs interactive requests nothing)."""
    by_key = {(level.target, level.concurrency): level for level in levels}
    rows = []
    for concurrency, progress in batches.items():
        idle, busy = by_key.get(("inferq", concurrency)), by_key.get((BUSY_TARGET, concurrency))
        if idle is None or busy is None:
            continue
        rows.append(
            {
                "concurrency": concurrency,
                "idle_ttft_p50_ms": idle.ttft_ms.p50,
                "busy_ttft_p50_ms": busy.ttft_ms.p50,
                "ttft_p50_ratio_busy_over_idle": _ratio(busy.ttft_ms.p50, idle.ttft_ms.p50),
                "idle_output_tok_s": idle.output_throughput,
                "busy_output_tok_s": busy.output_throughput,
                "batch_lines": progress.lines,
                "batch_lines_completed_during_level": progress.completed_during_level,
            }
        )
    return rows


def format_batch_comparison(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = [
        "",
        "interactive traffic with a batch running vs idle, same run (TTFT x = busy/idle: 1.0 means unaffected)",
        f"{'conc':>5}{'idle TTFT ms':>14}{'busy TTFT ms':>14}{'TTFT x':>8}{'idle tok/s':>12}{'busy tok/s':>12}"
        f"{'batch lines done':>18}",
    ]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>5}{_num(row['idle_ttft_p50_ms']):>14}{_num(row['busy_ttft_p50_ms']):>14}"
            f"{_num(row['ttft_p50_ratio_busy_over_idle'], 2):>8}{_num(row['idle_output_tok_s']):>12}"
            f"{_num(row['busy_output_tok_s']):>12}{row['batch_lines_completed_during_level']:>18}"
        )
    return "\n".join(lines) + "\n"


def format_comparison(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = [
        "",
        "inferq vs baseline, same run (ratios > 1 mean inferq is better: tok/s inferq/baseline, TTFT baseline/inferq)",
        f"{'conc':>5}{'inferq tok/s':>14}{'base tok/s':>12}{'tok/s x':>9}"
        f"{'inferq TTFT ms':>16}{'base TTFT ms':>14}{'TTFT x':>8}",
    ]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>5}{_num(row['inferq_output_tok_s']):>14}{_num(row['baseline_output_tok_s']):>12}"
            f"{_num(row['tok_s_ratio_inferq_over_baseline'], 2):>9}{_num(row['inferq_ttft_p50_ms']):>16}"
            f"{_num(row['baseline_ttft_p50_ms']):>14}{_num(row['ttft_p50_ratio_baseline_over_inferq'], 2):>8}"
        )
    return "\n".join(lines) + "\n"


def write_json(
    path: Path,
    cfg: BenchConfig,
    info: RunInfo,
    levels: list[LevelResult],
    batch_rows: list[dict[str, Any]] | None = None,
    structured_rows: list[dict[str, Any]] | None = None,
    validation: dict[str, Stats] | None = None,
) -> None:
    config = dataclasses.asdict(cfg) | {"api_key": "<redacted>" if cfg.api_key else None}  # results get shared
    document = {
        "config": config,
        "run": dataclasses.asdict(info),
        "levels": [dataclasses.asdict(level) for level in levels],
        "comparison": comparison(levels),
        "background_batch": batch_rows or [],
        "structured": structured_rows or [],
        "edge_validation_ms": {name: dataclasses.asdict(stats) for name, stats in (validation or {}).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
