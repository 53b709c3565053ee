"""The engine's side of prefix caching: sizing the store at start-up, keying a request's prompt at intake, copying
the scheduler's hits into their slots before a step, keeping a sequence's prompt blocks when it ends, and handing
the memory of evicted blocks back. Torch-free: the runner does the copies (prefix_store.py), prefix_cache.py keeps
the books."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from engine_worker.prefix_cache import BLOCK_SIZE, STORE_FRACTION, CacheHit, PrefixCache, block_keys

if TYPE_CHECKING:
    from contracts import GenerateRequest
    from engine_worker.executor import ModelExecutor
    from engine_worker.kv_cache import KVCacheManager
    from engine_worker.sequence import Sequence


log = structlog.get_logger(__name__)

MIB = 2**20


@dataclass(frozen=True, slots=True)
class StoreSize:
    blocks: int
    reason: str


def choose_store_size(*, capacity: int, bytes_per_token: int, max_mib: float) -> StoreSize:
    """Blocks of the prefix store: `max_mib` of KV, but never more than a quarter of the KV capacity (cached blocks
    count against it, and running work must keep most of it), and at least one block."""
    by_capacity = capacity // STORE_FRACTION // BLOCK_SIZE
    by_memory = int(max_mib * MIB) // (bytes_per_token * BLOCK_SIZE)
    if by_memory < by_capacity:
        return StoreSize(max(1, by_memory), "prefix_cache_max_mib")
    return StoreSize(max(1, by_capacity), "a quarter of the KV capacity")


class PrefixCaching:
    def __init__(self, cache: PrefixCache, runner: ModelExecutor, kv: KVCacheManager) -> None:
        self.cache = cache
        self.runner = runner
        self.kv = kv
        kv.prefix_cache = cache  # the store's blocks count against the KV capacity and give way to running work

    @classmethod
    def sized_for(cls, kv: KVCacheManager, runner: ModelExecutor, max_mib: float) -> PrefixCaching:
        """A store of `max_mib` at most (docs/prefix-caching.md), its buffers on the runner; the figure is logged
        once at start-up, beside `kv_cache.sized`."""
        bytes_per_token = runner.kv_bytes_per_token
        size = choose_store_size(capacity=kv.capacity, bytes_per_token=bytes_per_token, max_mib=max_mib)
        runner.allocate_prefix_store(size.blocks, BLOCK_SIZE)
        log.info(
            "prefix_cache.sized",
            blocks=size.blocks,
            tokens=size.blocks * BLOCK_SIZE,
            mib=round(size.blocks * BLOCK_SIZE * bytes_per_token / MIB, 1),
            reason=size.reason,
            prefix_cache_max_mib=max_mib,
            kv_cache_tokens=kv.capacity,
        )
        return cls(PrefixCache(size.blocks), runner, kv)

    @staticmethod
    def keys(request: GenerateRequest) -> list[bytes]:
        """Keys of the whole blocks of what the request's sequences start from (prompt, then resumed tokens),
        salted with its owner's `cache_salt`."""
        return block_keys([*request.prompt_token_ids, *request.resume_token_ids], request.cache_salt)

    def load(self, hits: list[CacheHit]) -> None:
        """Copy the step's hits into their (now assigned) slots, then unpin them. Before the step's forward: the
        blocks this pass's admissions evicted are handed back first, so the slots grow into memory the store gave
        up rather than beside it."""
        self._release_evicted()
        if not hits:
            return
        self.runner.load_prefixes([(hit.seq.slot, list(hit.block_ids)) for hit in hits if hit.seq.slot is not None])
        for hit in hits:
            self.cache.release(hit)

    def save(self, seq: Sequence, slot: int) -> None:
        """Keep the whole prompt blocks `seq` computed (its slot still holds them: freed slots are reused only
        from the next step). Only the prompt: the KV of a finished choice's last tokens may include rejected draft
        positions, and a conversation's next turn re-sends its prompt anyway."""
        valid = min(seq.num_computed_tokens, seq.num_prompt_tokens + seq.num_resume_tokens)
        keys = seq.cache_keys[: valid // self.cache.block_size]
        copies = self.cache.insert(keys, self.kv.spare_tokens)
        if copies:
            self.runner.save_prefix(slot, copies)
        self._release_evicted()

    def _release_evicted(self) -> None:
        """The pages of blocks evicted and not reused go back to the OS (a few syscalls; none when nothing was)."""
        freed = self.cache.take_freed()
        if freed:
            self.runner.release_prefix_blocks(freed)

    @property
    def stats(self) -> tuple[int, int]:
        """(prompt tokens looked up, of which found cached): vLLM's prefix cache queries and hits."""
        return self.cache.queries_total, self.cache.hits_total
