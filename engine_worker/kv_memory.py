"""Worker memory: zeroed KV buffers whose memory is committed on first write (CPU), so a generous capacity
costs nothing until sequences actually use it.

On a CPU the buffers are slices of one private anonymous mapping: the kernel hands out zero pages and backs a page
with memory only when it is first written. The slot layout (kv_cache.py) packs running sequences into the lowest
slots of each buffer, so the resident part of the cache is the high-water mark of what ran at once, while the
hot path never allocates (a page faults in once, the first time a slot reaches it). Reading a never-written page
maps the shared zero page and commits nothing, so decode attention over a whole slot stays cheap.
On other devices the buffers are allocated (and zeroed) up front.

`BlockBuffers` lays the prefix store out the other way round (prefix_store.py): block-major, each block's share
of every buffer one page-aligned range, so that one evicted block's pages can be handed back on their own.

And `release_freed_memory` (after the model load) and `trim_heap` (when the engine idles): glibc keeps freed heap
pages mapped, in every thread's arena, until asked to give them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap

import torch


def commits_lazily(device: torch.device) -> bool:
    return device.type == "cpu"


class KVBuffers:
    """`count` zeroed flat buffers of `numel` elements each, on `device`."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lazy = commits_lazily(device)
        self._mapping: mmap.mmap | None = None
        if not self.lazy:
            self.buffers = [torch.zeros((numel,), dtype=dtype, device=device) for _ in range(count)]
            return
        itemsize = _itemsize(dtype)
        # Each buffer starts on a page boundary, so the pages one layer touches are its own.
        stride = _page_round_up(numel * itemsize) // itemsize
        self._mapping, whole = _lazy_zeros(count * stride, dtype)
        self.buffers = [whole[i * stride : i * stride + numel] for i in range(count)]

    def release(self) -> None:
        """Hand every page back to the kernel; they read as zeros again and are committed anew when written.
        Only while no sequence holds KV (the engine is idle), so a burst's high-water mark does not stay."""
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)


class BlockBuffers:
    """`count` zeroed buffers of `num_blocks` blocks of `block_numel` elements each, on `device`, laid out
    block-major: `buffers[i]` is a `[num_blocks, block_numel]` view whose rows are `block_bytes` apart, and block b
    of every buffer lies in one page-aligned range. On a CPU that range is committed when the block is first
    written and `release_blocks` hands it back alone; on other devices it is allocated up front and stays."""

    def __init__(self, count: int, num_blocks: int, block_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lazy = commits_lazily(device)
        self._mapping: mmap.mmap | None = None
        itemsize = _itemsize(dtype)
        nbytes = count * block_numel * itemsize
        self.block_bytes = _page_round_up(nbytes) if self.lazy else nbytes  # a block's pages are its own
        if self.lazy:
            self._mapping, flat = _lazy_zeros(num_blocks * self.block_bytes // itemsize, dtype)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MiB huge page would span blocks and outlive their release
                self._mapping.madvise(mmap.MADV_NOHUGEPAGE)
            whole = flat.view(num_blocks, self.block_bytes // itemsize)
        else:
            whole = torch.zeros((num_blocks, count * block_numel), dtype=dtype, device=device)
        self.buffers = [whole[:, i * block_numel : (i + 1) * block_numel] for i in range(count)]

    def release_blocks(self, first: int, count: int) -> None:
        """Hand the pages of blocks first..first+count back to the kernel (CPU): they read as zeros again and are
        committed anew when written. Only blocks nobody holds."""
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED, first * self.block_bytes, count * self.block_bytes)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _page_round_up(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def _lazy_zeros(numel: int, dtype: torch.dtype) -> tuple[mmap.mmap, torch.Tensor]:
    """A private anonymous mapping of `numel` elements and a flat tensor over it: zero pages until written."""
    mapping = mmap.mmap(-1, max(1, numel * _itemsize(dtype)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mapping, torch.frombuffer(mapping, dtype=dtype)


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's freed heap back to the kernel. Loading a model frees hundreds of MB
    (the HF module, conversion buffers) that glibc otherwise keeps mapped, resident in the worker for its life."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Give the free pages of every malloc arena back to the kernel (`malloc_trim(0)`). A step's activations are
    freed when it ends, but glibc keeps the pages of freed chunks below the top of an arena, so after a burst the
    engine thread's arena stays as large as the burst made it. A few milliseconds; never on the hot path."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
