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
    servers: dict[str, str] = dataclasses.field(default_factory=dict)  # chat workloads: name -> what/where
    memories: dict[str, MemoryReport] = dataclasses.field(default_factory=dict)  # chat workloads: RSS by server


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


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


# --workload multiturn: first turns apart from later ones (which a prefix cache serves), and the cache's share.
_TURN_COLUMNS: list[tuple[str, int, Callable[[LevelResult], str]]] = [
    ("t1 TTFT p50", 12, lambda r: _num(r.first_turn_ttft_ms.p50 if r.first_turn_ttft_ms else None)),
    ("t2+ TTFT p50", 13, lambda r: _num(r.later_turn_ttft_ms.p50 if r.later_turn_ttft_ms else None)),
    ("t2+ TTFT p99", 13, lambda r: _num(r.later_turn_ttft_ms.p99 if r.later_turn_ttft_ms else None)),
]
_CACHED_COLUMN = ("cached tok", 11, lambda r: _share(r.cached_share))
_HIT_COLUMN = ("cache hits", 11, lambda r: _share(r.prefix_cache_hit_rate))


def _row(columns: list, cells: list[str]) -> str:
    first, *rest = cells
    widths = [width for _, width, _ in columns]
    return f"{first:<{widths[0]}}" + "".join(f"{cell:>{w}}" for cell, w in zip(rest, widths[1:], strict=True))


def format_table(cfg: BenchConfig, info: RunInfo, levels: list[LevelResult]) -> str:
    prompts = f"input {cfg.input_len} tokens"
    if cfg.workload == "realistic":
        prompts = "workload realistic (natural-language questions, /v1/chat/completions)"
    elif cfg.workload == "multiturn":
        prompts = f"workload multiturn ({cfg.turns} turns per conversation, shared system prompt, chat)"
    heading = [
        f"inferq bench: {prompts}, output {cfg.output_len} tokens (ignore_eos), "
        f"{f'temperature {cfg.temperature:g}' if cfg.temperature > 0 else 'greedy'}, warm-up {cfg.warmup}",
    ]
    heading += [f"  {name}: {where}" for name, where in info.servers.items()]
    if info.model is not None and not info.servers:
        heading.append(f"  inferq:   {info.model} at {cfg.base_url}{info.endpoint}; prompts as {info.prompt_source}")
    if info.baseline is not None:
        heading.append(f"  baseline: transformers generate(), one request at a time, {info.baseline}")
    if cfg.background_batch:
        heading.append(
            f"  {BUSY_TARGET}:   inferq again, while a /v1/batches job of {cfg.background_batch} lines "
            "(same prompt and output lengths) runs"
        )
    width = max([_COLUMNS[0][1], *(len(level.target) + 2 for level in levels)])  # names like "llama-server"
    columns = [("target", width, _COLUMNS[0][2]), *_COLUMNS[1:]]
    columns += [_EDGE_COLUMN] if any(level.edge_ms is not None for level in levels) else []
    columns += [_DRAFTS_COLUMN] if any(level.draft_tokens for level in levels) else []
    columns += _TURN_COLUMNS if any(level.later_turn_ttft_ms is not None for level in levels) else []
    columns += [_CACHED_COLUMN] if any(level.cached_share is not None for level in levels) else []
    columns += [_HIT_COLUMN] if any(level.prefix_cache_hit_rate is not None for level in levels) else []
    lines = [*heading, "", _row(columns, [name for name, _, _ in columns])]
    lines += [_row(columns, [cell(level) for _, _, cell in columns]) for level in levels]
    return "\n".join(lines) + "\n"


def comparison(levels: list[LevelResult], ours: str = "inferq", other: str = "baseline") -> list[dict[str, Any]]:
    """`ours` next to `other` at each concurrency both ran; both ratios are > 1 when `ours` is better.
    Each level pairs with the next level of the other side at that concurrency (whichever ran first; a repeated
    concurrency gets a row each)."""
    waiting: dict[tuple[str, int], LevelResult] = {}  # levels whose counterpart is still to come
    rows = []
    for level in levels:
        if level.target not in (ours, other):
            continue
        counterpart = other if level.target == ours else ours
        match = waiting.pop((counterpart, level.concurrency), None)
        if match is None:
            waiting[(level.target, level.concurrency)] = level
        else:
            rows.append(_comparison_row(*((level, match) if level.target == ours else (match, level))))
    return rows


def _comparison_row(ours: LevelResult, other: LevelResult) -> dict[str, Any]:
    a, b = ours.target, other.target
    row = {
        "concurrency": ours.concurrency,
        f"{a}_output_tok_s": ours.output_throughput,
        f"{b}_output_tok_s": other.output_throughput,
        f"tok_s_ratio_{a}_over_{b}": _ratio(ours.output_throughput, other.output_throughput),
        f"{a}_ttft_p50_ms": ours.ttft_ms.p50,
        f"{b}_ttft_p50_ms": other.ttft_ms.p50,
        f"ttft_p50_ratio_{b}_over_{a}": _ratio(other.ttft_ms.p50, ours.ttft_ms.p50),
    }
    if ours.later_turn_ttft_ms is not None and other.later_turn_ttft_ms is not None:
        row |= {
            f"{a}_later_turn_ttft_p50_ms": ours.later_turn_ttft_ms.p50,
            f"{b}_later_turn_ttft_p50_ms": other.later_turn_ttft_ms.p50,
            f"later_turn_ttft_p50_ratio_{b}_over_{a}": _ratio(
                other.later_turn_ttft_ms.p50, ours.later_turn_ttft_ms.p50
            ),
        }
    return row


def peer_comparisons(levels: list[LevelResult], peer: str) -> dict[str, list[dict[str, Any]]]:
    """Every other server of the run against the peer, by that server's name (no peer levels: nothing)."""
    names = dict.fromkeys(level.target for level in levels if level.target != peer)
    return {name: rows for name in names if (rows := comparison(levels, name, peer))}


def reference_target(cfg: BenchConfig, levels: list[LevelResult]) -> str | None:
    """What the chat workloads' ratios are taken against: the peer, else the first of several started variants
    (e.g. cache off, the fast path), else nothing."""
    names = list(dict.fromkeys(level.target for level in levels))
    if cfg.peer_name in names:
        return cfg.peer_name
    return names[0] if cfg.serve_variants and len(names) > 1 else None


def reference_comparisons(cfg: BenchConfig, levels: list[LevelResult]) -> dict[str, list[dict[str, Any]]]:
    reference = reference_target(cfg, levels)
    return peer_comparisons(levels, reference) if reference is not None else {}


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


def format_comparison(rows: list[dict[str, Any]], ours: str = "inferq", other: str = "baseline") -> str:
    if not rows:
        return ""
    a, b = ours, other
    later = f"later_turn_ttft_p50_ratio_{b}_over_{a}" in rows[0]
    lines = [
        "",
        f"{a} vs {b}, same run (ratios > 1 mean {a} is better: tok/s {a}/{b}, TTFT {b}/{a})",
        f"{'conc':>5}{a[:10] + ' tok/s':>17}{b[:10] + ' tok/s':>17}{'tok/s x':>9}"
        f"{a[:10] + ' TTFT ms':>19}{b[:10] + ' TTFT ms':>19}{'TTFT x':>8}" + (f"{'t2+ TTFT x':>12}" if later else ""),
    ]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>5}{_num(row[f'{a}_output_tok_s']):>17}{_num(row[f'{b}_output_tok_s']):>17}"
            f"{_num(row[f'tok_s_ratio_{a}_over_{b}'], 2):>9}{_num(row[f'{a}_ttft_p50_ms']):>19}"
            f"{_num(row[f'{b}_ttft_p50_ms']):>19}{_num(row[f'ttft_p50_ratio_{b}_over_{a}'], 2):>8}"
            + (f"{_num(row[f'later_turn_ttft_p50_ratio_{b}_over_{a}'], 2):>12}" if later else "")
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
    # Results get shared: no keys in them.
    config = dataclasses.asdict(cfg) | {
        "api_key": "<redacted>" if cfg.api_key else None,
        "peer_api_key": "<redacted>" if cfg.peer_api_key else None,
    }
    document = {
        "config": config,
        "run": dataclasses.asdict(info),
        "levels": [dataclasses.asdict(level) for level in levels],
        "comparison": comparison(levels),
        "peer_comparison": reference_comparisons(cfg, levels),
        "background_batch": batch_rows or [],
        "structured": structured_rows or [],
        "edge_validation_ms": {name: dataclasses.asdict(stats) for name, stats in (validation or {}).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
