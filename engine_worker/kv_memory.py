"""Worker memory: zeroed KV buffers whose memory is committed on first write (CPU), so a generous capacity
costs nothing until sequences actually use it.

On a CPU the buffers are slices of one private anonymous mapping: the kernel hands out zero pages and backs a page
with memory only when it is first written. The slot layout (kv_cache.py) packs running sequences into the lowest
slots of each buffer, so the resident part of the cache is the high-water mark of what ran at once, while the
hot path never allocates (a page faults in once, the first time a slot reaches it). Reading a never-written page
maps the shared zero page and commits nothing, so decode attention over a whole slot stays cheap.
On other devices the buffers are allocated (and zeroed) up front.

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
        itemsize = torch.empty((), dtype=dtype).element_size()
        # Each buffer starts on a page boundary, so the pages one layer touches are its own.
        stride = -(-numel * itemsize // mmap.PAGESIZE) * mmap.PAGESIZE // itemsize
        self._mapping = mmap.mmap(-1, max(1, count * stride * itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(self._mapping, dtype=dtype)
        self.buffers = [whole[i * stride : i * stride + numel] for i in range(count)]

    def release(self) -> None:
        """Hand every page back to the kernel; they read as zeros again and are committed anew when written.
        Only while no sequence holds KV (the engine is idle), so a burst's high-water mark does not stay."""
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)


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
