"""How much of a mapping is resident, page by page (`mincore`): for tests that check memory really went back to
the OS. Linux only; `resident_bytes` returns None where it cannot tell."""

from __future__ import annotations

import ctypes
import mmap
import sys


def resident_bytes(address: int, length: int) -> int | None:
    """Bytes of the page-aligned range [address, address + length) that are mapped to memory now."""
    if not sys.platform.startswith("linux"):
        return None
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        return None
    return sum(byte & 1 for byte in vec) * mmap.PAGESIZE


def store_resident_bytes(store) -> int | None:
    """Resident bytes of a `PrefixStore`'s mapping (block 0 of its first buffer is where the mapping starts)."""
    return resident_bytes(store.blocks[0].data_ptr(), store.shape[0] * store.bytes_per_block)
