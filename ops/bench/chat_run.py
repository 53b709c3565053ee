"""The chat workloads' run (`--workload realistic|multiturn`): every measured server — the one at --base-url or
the `--serve-variant`s the bench starts, then the peer (`--peer-url`, or `--peer llama-server` started here) —
gets the same requests, level by level, one target right after the other, so a machine busier for a while skews
every side of a ratio alike."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
import structlog

from ops.bench.client import PATHS, PREFIX_CACHE_COUNTERS, OpenAIStreamTarget
from ops.bench.config import BenchConfig, BenchError
from ops.bench.levels import measure
from ops.bench.memory import RssSampler, server_root
from ops.bench.metrics import LevelResult, RequestResult
from ops.bench.report import RunInfo
from ops.bench.servers import started_inferq, started_llama_server
from ops.bench.workloads import ChatRequest, Conversation, conversations, realistic_requests

log = structlog.get_logger(__name__)

LEVEL_INDEX_STRIDE = 100_000  # each level's conversations get indices of their own: no prefix repeats a level's


@dataclasses.dataclass(slots=True)
class Measured:
    """One server in the run: how to reach it, and its RSS sampler (None when it is not a local process)."""

    target: OpenAIStreamTarget
    sampler: RssSampler | None


class _Questions:
    """Sends single-question chats (the realistic workload)."""

    def __init__(self, target: OpenAIStreamTarget) -> None:
        self.name = target.name
        self._target = target

    async def __call__(self, request: ChatRequest) -> RequestResult:
        result, _ = await self._target.send_chat(request)
        return result


class _Conversations:
    """Plays one conversation: each turn is sent when the previous answer has arrived, with that answer in it."""

    def __init__(self, target: OpenAIStreamTarget) -> None:
        self.name = target.name
        self._target = target

    async def __call__(self, conversation: Conversation) -> list[RequestResult]:
        results = []
        for turn in range(1, conversation.turns + 1):
            result, answer = await self._target.send_chat(conversation.request(turn))
            results.append(result)
            if not result.ok:
                break  # the next turn would need this answer
            conversation.answers.append(answer)
        return results


async def run_chat(cfg: BenchConfig, log_dir: Path) -> tuple[list[LevelResult], RunInfo]:
    """All levels against every target (started servers log into `log_dir`); the levels in run order, and what
    was measured with each local server's memory."""
    async with AsyncExitStack() as stack:
        measured = [m async for m in _targets(cfg, stack, log_dir)]
        for item in measured:
            await warm_up(item.target, cfg)
        levels = []
        for position, concurrency in enumerate(cfg.concurrency):
            for item in measured:
                levels.append(await measure_chat(item.target, cfg, concurrency, position))
    # Out of the stack: the samplers have taken their last samples and stopped.
    first = measured[0].target
    info = RunInfo(
        model=first.model,
        endpoint=PATHS["chat"],
        prompt_source="natural-language chat (ops/bench/data)",
        baseline=None,
        servers={item.target.name: f"{item.target.model} at {item.target.client.base_url}" for item in measured},
        memories={item.target.name: item.sampler.report for item in measured if item.sampler is not None},
    )
    return levels, info


async def _targets(cfg: BenchConfig, stack: AsyncExitStack, log_dir: Path) -> AsyncIterator[Measured]:
    if cfg.serve_variants:
        for variant in cfg.serve_variants:
            server = await stack.enter_async_context(started_inferq(variant, log_dir))
            target = await stack.enter_async_context(
                OpenAIStreamTarget.connect(
                    cfg, base_url=server.base_url, name=variant.name, api_key=cfg.api_key, model=cfg.model
                )
            )
            yield Measured(target, stack.enter_context(_sampling(psutil.Process(server.pid), cfg)))
    else:
        target = await stack.enter_async_context(OpenAIStreamTarget.connect(cfg))
        yield Measured(target, stack.enter_context(_sampling(_local_root(cfg.base_url, cfg.server_pid), cfg)))
    if cfg.peer == "llama-server":
        started = await stack.enter_async_context(started_llama_server(cfg, log_dir))
        if started is not None:
            peer = await stack.enter_async_context(
                OpenAIStreamTarget.connect(cfg, base_url=started.base_url, name=cfg.peer_name, model=cfg.peer_model)
            )
            yield Measured(peer, stack.enter_context(_sampling(psutil.Process(started.pid), cfg)))
    elif cfg.peer_url:
        peer = await stack.enter_async_context(
            OpenAIStreamTarget.connect(
                cfg, base_url=cfg.peer_url, name=cfg.peer_name, api_key=cfg.peer_api_key, model=cfg.peer_model
            )
        )
        yield Measured(peer, stack.enter_context(_sampling(_local_root(cfg.peer_url, None), cfg)))


def _local_root(url: str, pid: int | None) -> psutil.Process | None:
    try:
        return server_root(url, pid)
    except psutil.Error as exc:
        raise BenchError(f"--server-pid {pid}: {exc}") from exc


@contextmanager
def _sampling(root: psutil.Process | None, cfg: BenchConfig) -> Iterator[RssSampler | None]:
    """RSS sampling of one server's process tree for the whole run (None for a server that is not local)."""
    if root is None:
        yield None
        return
    sampler = RssSampler(root, settle_s=cfg.rss_settle_s).start()
    try:
        yield sampler
    finally:
        sampler.stop()


async def warm_up(target: OpenAIStreamTarget, cfg: BenchConfig) -> None:
    """Unmeasured single questions (negative indices; no system prompt, so no conversation's prefix is primed)."""
    for request in realistic_requests(cfg.seed, cfg.warmup, first_index=-cfg.warmup):
        result, _ = await target.send_chat(request)
        if not result.ok:
            raise BenchError(f"{target.name} warm-up request failed: {result.error}", exit_code=1)


def level_work(cfg: BenchConfig, concurrency: int, position: int) -> list[Any]:
    """What one target is sent at one level: fresh objects each time (conversations collect their answers)."""
    count = cfg.requests_for(concurrency)
    first = position * LEVEL_INDEX_STRIDE
    if cfg.workload == "multiturn":
        return conversations(cfg.seed, count, cfg.turns, first_index=first)
    return realistic_requests(cfg.seed, count, first_index=first)


async def measure_chat(target: OpenAIStreamTarget, cfg: BenchConfig, concurrency: int, position: int) -> LevelResult:
    """One level on one target, with the prefix-cache hit rate from its /metrics when it exports one."""
    sender = _Conversations(target) if cfg.workload == "multiturn" else _Questions(target)
    before = await target.counters(PREFIX_CACHE_COUNTERS)
    level = await measure(sender, level_work(cfg, concurrency, position), concurrency)
    after = await target.counters(PREFIX_CACHE_COUNTERS) if before is not None else None
    if before is not None and after is not None and after[0] > before[0]:
        level.prefix_cache_hit_rate = (after[1] - before[1]) / (after[0] - before[0])
    return level
