"""The engine's side of prefix caching: sizing the store at start-up, keying a request's prompt at intake, copying
the scheduler's hits into their slots before a step, and keeping a sequence's prompt blocks when it ends.
Torch-free: the runner does the copies (prefix_store.py), prefix_cache.py keeps the books."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine_worker.prefix_cache import BLOCK_SIZE, STORE_FRACTION, CacheHit, PrefixCache, block_keys

if TYPE_CHECKING:
    from contracts import GenerateRequest
    from engine_worker.executor import ModelExecutor
    from engine_worker.kv_cache import KVCacheManager
    from engine_worker.sequence import Sequence


class PrefixCaching:
    def __init__(self, cache: PrefixCache, runner: ModelExecutor, kv: KVCacheManager) -> None:
        self.cache = cache
        self.runner = runner
        self.kv = kv
        kv.prefix_cache = cache  # the store's blocks count against the KV capacity and give way to running work

    @classmethod
    def sized_for(cls, kv: KVCacheManager, runner: ModelExecutor) -> PrefixCaching:
        """A store of a quarter of the KV capacity (docs/prefix-caching.md), its buffers on the runner."""
        num_blocks = max(1, kv.capacity // STORE_FRACTION // BLOCK_SIZE)
        runner.allocate_prefix_store(num_blocks, BLOCK_SIZE)
        return cls(PrefixCache(num_blocks), runner, kv)

    @staticmethod
    def keys(request: GenerateRequest) -> list[bytes]:
        """Keys of the whole blocks of what the request's sequences start from (prompt, then resumed tokens),
        salted with its owner's `cache_salt`."""
        return block_keys([*request.prompt_token_ids, *request.resume_token_ids], request.cache_salt)

    def load(self, hits: list[CacheHit]) -> None:
        """Copy the step's hits into their (now assigned) slots, then unpin them."""
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

    @property
    def stats(self) -> tuple[int, int]:
        """(prompt tokens looked up, of which found cached): vLLM's prefix cache queries and hits."""
        return self.cache.queries_total, self.cache.hits_total
