"""Runs every concurrency level against each target, then reports."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import psutil
import structlog

from common.logging import configure_logging
from ops.bench.background import BatchProgress, background_batch
from ops.bench.baseline import BaselineTarget
from ops.bench.chat_run import run_chat
from ops.bench.client import OpenAIStreamTarget
from ops.bench.config import BenchConfig, BenchError, parse_args
from ops.bench.edge_latency import TokenObserver
from ops.bench.levels import Target, measure
from ops.bench.memory import RssSampler, format_memory, server_root
from ops.bench.metrics import LevelResult, RequestResult, Stats
from ops.bench.prompts import prompt_set
from ops.bench.report import (
    BUSY_TARGET,
    RunInfo,
    batch_comparison,
    comparison,
    format_batch_comparison,
    format_comparison,
    format_table,
    reference_comparisons,
    reference_target,
    write_json,
)
from ops.bench.servers import build_llama_server
from ops.bench.structured import format_structured, measure_validation, structured_comparison, structured_target

log = structlog.get_logger(__name__)


def main(argv: list[str]) -> int:
    """`inferq bench`: 0 on success, 1 on failed requests with --fail-on-error, 2 on a setup problem."""
    try:
        cfg = parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already explained
        return exc.code if isinstance(exc.code, int) else 0
    if not structlog.is_configured():  # the inferq CLI configures logging itself; direct callers get ours
        configure_logging(cfg.log_level)
    if cfg.build_peer is not None:
        return build_llama_server(cfg.build_peer)
    try:
        if cfg.chat_workload:
            # Started servers log there (made only when one is started; kept for reading after the run).
            log_dir = Path(tempfile.gettempdir()) / f"inferq-bench-servers-{uuid.uuid4().hex[:8]}"
            levels, info = asyncio.run(run_chat(cfg, log_dir))
            batches: dict[int, BatchProgress] = {}
        else:
            levels, info, batches = asyncio.run(run(cfg))
    except BenchError as exc:
        log.error(str(exc))
        return exc.exit_code
    batch_rows = batch_comparison(levels, batches)
    peers, reference = reference_comparisons(cfg, levels), reference_target(cfg, levels)
    structured_rows = structured_comparison(levels) if cfg.structured else []
    validation = measure_validation() if cfg.structured else {}
    sys.stdout.write(
        format_table(cfg, info, levels)
        + format_comparison(comparison(levels))
        + "".join(format_comparison(rows, name, reference or "") for name, rows in peers.items())
        + format_batch_comparison(batch_rows)
        + format_structured(structured_rows, validation)
        + format_memory(info.memory)
        + "".join(format_memory(report, f"{name} memory") for name, report in info.memories.items())
    )
    if cfg.json_path is not None:
        write_json(cfg.json_path, cfg, info, levels, batch_rows, structured_rows, validation)
    failed = sum(level.errors for level in levels)
    if failed and cfg.fail_on_error:
        log.error("requests failed", failed=failed)
        return 1
    return 0


class _DuringBatch:
    """The server target, measured while a background batch runs (its own name in the tables)."""

    name = BUSY_TARGET

    def __init__(self, server: OpenAIStreamTarget) -> None:
        self._server = server

    async def prepare(self, prompts: list[list[int]]) -> None:
        await self._server.prepare(prompts)

    async def __call__(self, ids: list[int]) -> RequestResult:
        return await self._server(ids)


async def run(cfg: BenchConfig) -> tuple[list[LevelResult], RunInfo, dict[int, BatchProgress]]:
    async with AsyncExitStack() as stack:
        # The server first: an unreachable one fails fast, before the baseline model is loaded.
        server = await stack.enter_async_context(OpenAIStreamTarget.connect(cfg)) if cfg.runs_server else None
        sampler = stack.enter_context(sample_server_memory(cfg)) if server is not None else None
        baseline = stack.enter_context(BaselineTarget.load(cfg)) if cfg.runs_baseline else None
        observer = (
            await stack.enter_async_context(TokenObserver.watching(cfg.observe_nats))
            if cfg.observe_nats and server is not None
            else None
        )
        targets: list[Target] = [target for target in (server, baseline) if target is not None]
        for target in targets:
            await warm_up(target, cfg)
        levels = []
        batches: dict[int, BatchProgress] = {}
        for concurrency in cfg.concurrency:
            prompts = prompt_set(cfg.seed, cfg.requests_for(concurrency), cfg.input_len)
            # Targets alternate per level, so a machine busier for a while skews both sides of a ratio alike.
            for target in targets:
                sent = prompts[: cfg.baseline_requests] if target is baseline else prompts
                await target.prepare(sent)
                if target is server:
                    level = await measure_server(server, sent, concurrency)
                else:
                    level = await measure(target, sent, concurrency)
                if observer is not None and target is server:
                    level.edge_ms = Stats.of_seconds(observer.added_latencies(level.requests))
                levels.append(level)
            if server is not None and cfg.structured:  # right after the unconstrained level: same machine state
                levels.append(await measure(structured_target(server), prompts, concurrency))
            if server is not None and cfg.background_batch:
                async with background_batch(server.client, cfg, server.model) as batches[concurrency]:
                    levels.append(await measure(_DuringBatch(server), prompts, concurrency))
        info = RunInfo(
            model=server.model if server else None,
            endpoint=server.path if server else None,
            prompt_source=server.prompt_source if server else "token ids (exact)",
            baseline=baseline.label if baseline else None,
        )
    # Out of the stack: the sampler has taken its last sample (after the traffic) and stopped.
    if sampler is not None:
        info = dataclasses.replace(info, memory=sampler.report)
    return levels, info, batches


@contextmanager
def sample_server_memory(cfg: BenchConfig) -> Iterator[RssSampler]:
    try:
        root = server_root(cfg.base_url, cfg.server_pid)
    except psutil.Error as exc:
        raise BenchError(f"--server-pid {cfg.server_pid}: {exc}") from exc
    note = None if root is not None else f"no process of this user listens locally behind {cfg.base_url}"
    sampler = RssSampler(root, note=note, settle_s=cfg.rss_settle_s).start()
    try:
        yield sampler
    finally:
        sampler.stop()


async def warm_up(target: Target, cfg: BenchConfig) -> None:
    """Unmeasured requests (negative prompt indices) so first-call costs stay out of the numbers."""
    prompts = prompt_set(cfg.seed, cfg.warmup, cfg.input_len, first_index=-cfg.warmup)
    await target.prepare(prompts)
    for ids in prompts:
        result = await target(ids)
        if not result.ok:
            raise BenchError(f"{target.name} warm-up request failed: {result.error}", exit_code=1)


async def measure_server(server: OpenAIStreamTarget, prompts: list[list[int]], concurrency: int) -> LevelResult:
    """`measure`, plus the speculative decoding the server did meanwhile (when its /metrics tells)."""
    before = await server.speculation_counters()
    level = await measure(server, prompts, concurrency)
    after = await server.speculation_counters() if before is not None else None
    if before is not None and after is not None:
        level.draft_tokens = after[0] - before[0]
        level.accepted_draft_tokens = after[1] - before[1]
    return level
