"""The device half of prefix caching: the cached blocks' KV, in buffers of their own, and the copies between
them and the slot cache (prefix_cache.py keeps the books; docs/prefix-caching.md says why a copy).

Per layer, one K and one V buffer viewed as `[blocks, kv_heads, block_size, head_dim]`, the slot layout cut
into blocks, so a copy is one strided copy per buffer per run of consecutive store blocks. The memory is
block-major (kv_memory.py `BlockBuffers`): a block's K and V of every layer are one page-aligned range. On a CPU
that range is committed when the block is first written and handed back when the block is evicted and not
reused at once (`release`), so the store holds at most its bound and shrinks when running work takes its room.
It is not handed back merely because the engine idles: keeping prefixes across the gaps between a
conversation's turns is the point (docs/prefix-caching.md).
"""

from __future__ import annotations

import torch

from engine_worker.kv_memory import BlockBuffers


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(slot block, store block) pairs as runs consecutive on both sides: (first slot block, first store block,
    length). Blocks are taken from the free list in order, so a prompt is usually one run; copying runs as
    slices is ~5x faster on a CPU than a gather of scattered blocks (measured, docs/prefix-caching.md)."""
    runs: list[tuple[int, int, int]] = []
    for index, block_id in pairs:
        if runs and (runs[-1][0] + runs[-1][2], runs[-1][1] + runs[-1][2]) == (index, block_id):
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((index, block_id, 1))
    return runs


class PrefixStore:
    def __init__(
        self,
        num_buffers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self._buffers = BlockBuffers(num_buffers, num_blocks, num_kv_heads * block_size * head_dim, dtype, device)
        self.blocks = [flat.view(self.shape) for flat in self._buffers.buffers]  # a view: rows stay a block apart

    @property
    def block_size(self) -> int:
        return self.shape[2]

    @property
    def bytes_per_block(self) -> int:
        """Memory one block takes (all buffers, padded to whole pages on a CPU)."""
        return self._buffers.block_bytes

    def release(self, block_ids: list[int]) -> None:
        """Give the pages of evicted blocks back to the OS (CPU): one `madvise` per run of consecutive ids."""
        for first, _, count in _runs([(block_id, block_id) for block_id in sorted(block_ids)]):
            self._buffers.release_blocks(first, count)

    def _slot_blocks(self, view: torch.Tensor, slot: int, first: int, count: int) -> torch.Tensor:
        """Blocks first..first+count of a slot, as a `[count, kv_heads, block_size, head_dim]` view."""
        size = self.block_size
        return view[slot, :, first * size : (first + count) * size].unflatten(1, (count, size)).transpose(0, 1)

    @torch.inference_mode()
    def save(self, slot_views: list[torch.Tensor], slot: int, copies: list[tuple[int, int]]) -> None:
        """Copy blocks of a slot into the store: (block index in the slot, store block id). `slot_views` are the
        cache's `[slots, kv_heads, slot_len, head_dim]` views, in the store's buffer order."""
        for first, block_id, count in _runs(copies):
            for view, blocks in zip(slot_views, self.blocks, strict=True):
                blocks[block_id : block_id + count].copy_(self._slot_blocks(view, slot, first, count))

    @torch.inference_mode()
    def load(self, slot_views: list[torch.Tensor], loads: list[tuple[int, list[int]]]) -> None:
        """Copy each (slot, store block ids) prefix into the first tokens of its slot."""
        for slot, ids in loads:
            for first, block_id, count in _runs(list(enumerate(ids))):
                for view, blocks in zip(slot_views, self.blocks, strict=True):
                    self._slot_blocks(view, slot, first, count).copy_(blocks[block_id : block_id + count])
