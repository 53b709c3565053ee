"""The device half of prefix caching: the cached blocks' KV, in buffers of their own, and the copies between
them and the slot cache (prefix_cache.py keeps the books; docs/prefix-caching.md says why a copy).

Per layer, one K and one V buffer viewed as `[blocks, kv_heads, block_size, head_dim]`, the slot layout cut
into blocks, so a copy is one gather and one strided write per buffer. On a CPU the memory is committed as
blocks are first written (kv_memory.py); it is not handed back when the engine idles, since keeping the
prefixes across the gaps between a conversation's turns is the point.
"""

from __future__ import annotations

import torch

from engine_worker.kv_memory import KVBuffers


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
        self._buffers = KVBuffers(num_buffers, num_blocks * num_kv_heads * block_size * head_dim, dtype, device)
        self.blocks = [flat.view(self.shape) for flat in self._buffers.buffers]

    @property
    def block_size(self) -> int:
        return self.shape[2]

    @torch.inference_mode()
    def save(self, slot_views: list[torch.Tensor], slot: int, copies: list[tuple[int, int]]) -> None:
        """Copy blocks of a slot into the store: (block index in the slot, store block id). `slot_views` are
        the cache's `[slots, kv_heads, slot_len, head_dim]` views, in the store's buffer order."""
        if not copies:
            return
        size = self.block_size
        device = self.blocks[0].device
        positions = torch.tensor([i * size + t for i, _ in copies for t in range(size)], device=device)
        ids = torch.tensor([block_id for _, block_id in copies], device=device)
        heads, dim = self.shape[1], self.shape[3]
        for view, blocks in zip(slot_views, self.blocks, strict=True):
            blocks[ids] = view[slot, :, positions].view(heads, len(copies), size, dim).transpose(0, 1)

    @torch.inference_mode()
    def load(self, slot_views: list[torch.Tensor], loads: list[tuple[int, list[int]]]) -> None:
        """Copy each (slot, store block ids) prefix into the first tokens of its slot."""
        device = self.blocks[0].device
        heads, size, dim = self.shape[1], self.shape[2], self.shape[3]
        for slot, block_ids in loads:
            ids = torch.tensor(block_ids, device=device)
            length = len(block_ids) * size
            for view, blocks in zip(slot_views, self.blocks, strict=True):
                view[slot, :, :length] = blocks[ids].transpose(0, 1).reshape(heads, length, dim)
