"""How many tokens of KV cache a worker sets aside: a pure function of the model's geometry, the configured
concurrency and context length, and the memory the machine has, with the reason for the figure.

The figure is an upper bound, not a reservation. On a CPU the runner maps the buffer lazily (model_runner.py,
`lazy_zeros`): the kernel commits a page the first time it is written, and the slot layout (kv_cache.py) keeps
running sequences compacted into the lowest slots, so resident memory follows the high-water mark of
`running sequences x slot length` rather than the capacity. The capacity only decides when the scheduler
preempts instead of growing; it is therefore sized for the worst case the scheduler can reach
(`max_num_seqs x max_model_len`) and capped so that even fully touched it fits the machine. On a GPU the buffer is
allocated up front, so the same cap is what the device holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from engine_worker.kv_cache import SLOT_ALIGN, round_up

if TYPE_CHECKING:
    from common.engine_config import EngineConfig
    from engine_worker.model_runner import ModelRunner

log = structlog.get_logger(__name__)

GIB = 2**30
AVAILABLE_MEMORY_FRACTION = 0.4  # of the memory available at start-up: weights, activations and others need the rest


@dataclass(frozen=True, slots=True)
class KVBudget:
    tokens: int
    bytes: int
    reason: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def choose_kv_budget(
    *,
    bytes_per_token: int,
    max_model_len: int,
    max_num_seqs: int,
    available_bytes: int | None,
    configured_tokens: int | None = None,
    cap_gib: float,
) -> KVBudget:
    """KV capacity in tokens (a multiple of the slot alignment, at least one full-length sequence).

    `configured_tokens` wins when set. Otherwise the capacity is what `max_num_seqs` sequences of `max_model_len`
    tokens could use, capped at `cap_gib` and at a fraction of `available_bytes` (None: unknown).
    """
    if bytes_per_token < 1 or max_model_len < 1 or max_num_seqs < 1:
        raise ValueError("bytes_per_token, max_model_len and max_num_seqs must be >= 1")
    one_sequence = round_up(max_model_len)
    if configured_tokens is not None:
        tokens = max(round_up(configured_tokens), one_sequence)
        reason = (
            "configured (kv_cache_tokens)"
            if tokens == round_up(configured_tokens)
            else ("configured kv_cache_tokens raised to one max_model_len sequence")
        )
        return KVBudget(tokens, tokens * bytes_per_token, reason)
    wanted = max_num_seqs * one_sequence
    caps = {"kv_cache_gib": int(cap_gib * GIB) // bytes_per_token}
    if available_bytes is not None:
        caps["available memory"] = int(available_bytes * AVAILABLE_MEMORY_FRACTION) // bytes_per_token
    binding = min(caps, key=caps.__getitem__)
    if wanted <= caps[binding]:
        tokens, reason = wanted, "max_num_seqs x max_model_len"
    else:
        tokens, reason = caps[binding] // SLOT_ALIGN * SLOT_ALIGN, f"capped by {binding}"
    if tokens < one_sequence:
        tokens, reason = one_sequence, f"{reason}, raised to one max_model_len sequence"
    return KVBudget(tokens, tokens * bytes_per_token, reason)


def size_kv_cache(config: EngineConfig, runner: ModelRunner) -> KVBudget:
    """The engine's KV capacity for this runner's model and device, logged with the reason."""
    from engine_worker.kv_memory import commits_lazily

    device = str(runner.device)
    available = available_memory_bytes(device)
    geometry = {
        "bytes_per_token": runner.kv_bytes_per_token,
        "max_model_len": runner.max_model_len,
        "max_num_seqs": config.max_num_seqs,
    }
    budget = choose_kv_budget(
        **geometry, available_bytes=available, configured_tokens=config.kv_cache_tokens, cap_gib=config.kv_cache_gib
    )
    log_kv_budget(budget, **geometry, available_bytes=available, lazy=commits_lazily(runner.device))
    return budget


def log_kv_budget(
    budget: KVBudget,
    *,
    bytes_per_token: int,
    max_model_len: int,
    max_num_seqs: int,
    available_bytes: int | None,
    lazy: bool,
) -> None:
    """The chosen figure and why, once at start-up (operators size machines by it)."""
    log.info(
        "kv_cache.sized",
        kv_cache_tokens=budget.tokens,
        kv_cache_gib=round(budget.gib, 3),
        reason=budget.reason,
        committed="on demand" if lazy else "up front",
        full_length_sequences=budget.tokens // round_up(max_model_len),
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        kib_per_token=round(bytes_per_token / 1024, 2),
        available_gib=None if available_bytes is None else round(available_bytes / GIB, 2),
    )
    if available_bytes is not None and budget.bytes > available_bytes:
        log.warning(
            "kv_cache.exceeds_available_memory",
            kv_cache_gib=round(budget.gib, 3),
            available_gib=round(available_bytes / GIB, 2),
        )


def available_memory_bytes(device: str) -> int | None:
    """Memory free for the KV cache on `device` now: the GPU's free memory, or on a CPU what the kernel reports
    available, lowered to the cgroup's remaining allowance in a container. None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device != "cpu":
        return None
    import psutil

    available = int(psutil.virtual_memory().available)
    remaining = _cgroup_remaining(Path("/sys/fs/cgroup"))
    return available if remaining is None else min(available, remaining)


def _cgroup_remaining(root: Path, membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """cgroup v2 `memory.max - memory.current` of this process's cgroup (None: no limit or not v2)."""
    try:
        lines = membership.read_text().splitlines()
        group = root / next(line for line in lines if line.startswith("0::"))[3:].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((group / "memory.current").read_text()))
    except (OSError, StopIteration, ValueError):
        return None
