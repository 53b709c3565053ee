"""Automatic prefix caching (issue #18), the bookkeeping half: which token blocks' KV the worker keeps after a
request ends, found again by a later request whose prompt starts with the same tokens. Torch-free; the runner
holds the KV itself (`prefix_store.PrefixStore`) and copies it in and out of slots (docs/prefix-caching.md).

- **Blocks and keys.** A prompt is cut into blocks of `BLOCK_SIZE` tokens; only whole blocks are cached. Block
  i's key is a SHA-256 over block i-1's key and block i's tokens, so a key names the whole prefix up to the end
  of its block (vLLM's hash chain). The first block's key also covers the request's `cache_salt` (the edge sets
  it from the API key owner): two tenants never find each other's blocks, nor time each other's hits.
- **LRU.** Blocks nobody is about to copy are evictable, least recently used first; a hit touches its chain
  deepest block first, so a chain is evicted from its tail and its shared root stays longest.
- **Budget.** Cached blocks count against the KV capacity (`KVCacheManager`): running sequences plus cached
  tokens fit in it. A sequence that needs room evicts cached blocks before anyone is preempted, and a finished
  sequence's blocks are cached only into room nothing running needs.
- **Bound.** The store has `num_blocks` blocks (prefix_caching.py sizes it from `prefix_cache_max_mib`): a new
  block beyond it takes the place of the least recently used one. Blocks evicted and not reused at once are
  handed to `take_freed`, so the store's memory behind them goes back to the OS.
- **Pins.** Between a hit (scheduling) and its copy into the sequence's slot (the same step, before the forward),
  the blocks are pinned so that a later admission in the same pass cannot evict them.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter, OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_worker.sequence import Sequence

# 32 tokens: a ~1,000-token system prompt is 31 blocks, so the per-block Python work (a hash, a dict entry) stays
# in the tens of microseconds, while the uncached tail (at most 31 tokens) costs a millisecond or two of prefill
# on this CPU. It divides the slot alignment (64), so cached prefixes end on attention-window boundaries.
BLOCK_SIZE = 32
STORE_FRACTION = 4  # the store's buffer holds capacity // STORE_FRACTION tokens (see docs/prefix-caching.md)


def block_keys(token_ids: Seq[int], salt: str | None, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The chained key of each whole block of `token_ids` (a trailing partial block has none)."""
    keys: list[bytes] = []
    parent = hashlib.sha256(b"inferq-prefix\0" + (salt or "").encode()).digest()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = ",".join(map(str, token_ids[start : start + block_size])).encode()
        parent = hashlib.sha256(parent + block).digest()
        keys.append(parent)
    return keys


@dataclass(frozen=True, slots=True)
class CacheHit:
    """Blocks of a sequence's prefix found in the store: their store ids in prefix order, pinned until copied."""

    seq: Sequence
    keys: list[bytes]
    block_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * BLOCK_SIZE


class PrefixCache:
    """`num_blocks` store blocks of `block_size` tokens. Owned by the engine thread."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # key -> store block id; front = evicted first
        # A heap: the lowest free id first, so a prompt's blocks tend to be consecutive in the store and are copied
        # as one slice (prefix_store.py).
        self._free: list[int] = list(range(num_blocks))
        self._pins: Counter[bytes] = Counter()
        self._freed: set[int] = set()  # evicted since the last `take_freed` and not taken again
        self.queries_total = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits_total = 0  # of which found cached (vLLM's prefix_cache_hits)

    @property
    def num_tokens(self) -> int:
        """Tokens of KV the store holds: what it takes from the KV capacity."""
        return len(self._blocks) * self.block_size

    @property
    def evictable_tokens(self) -> int:
        return (len(self._blocks) - len(self._pins)) * self.block_size

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    # --- hits -----------------------------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> CacheHit:
        """The longest cached prefix of `seq`'s whole blocks, leaving at least its last token to compute (the
        step samples from its logits). Pinned: `release` it once copied (or not used)."""
        usable = min(len(seq.cache_keys), (seq.num_tokens - 1) // self.block_size)
        keys: list[bytes] = []
        for key in seq.cache_keys[:usable]:
            if key not in self._blocks:
                break
            keys.append(key)
        self._touch(keys)
        self._pins.update(keys)
        return CacheHit(seq, keys, [self._blocks[key] for key in keys])

    def release(self, hit: CacheHit) -> None:
        """Unpin a hit's blocks (copied, or given up: then the hit is emptied)."""
        self._pins.subtract(hit.keys)
        self._pins = +self._pins  # drop zero counts
        hit.keys.clear()
        hit.block_ids.clear()

    def count(self, hit: CacheHit) -> None:
        """A looked-up sequence was admitted: its tokens were queried, the hit's were found."""
        self.queries_total += hit.seq.num_tokens
        self.hits_total += hit.num_tokens

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the root ends most recent: a chain is evicted from its tail
            self._blocks.move_to_end(key)

    # --- eviction and insertion -----------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Drop least recently used unpinned blocks until `num_tokens` are freed (or none is left to drop);
        returns the tokens freed."""
        freed = 0
        for key in [k for k in self._blocks if k not in self._pins]:
            if freed >= num_tokens:
                break
            block_id = self._blocks.pop(key)
            heapq.heappush(self._free, block_id)
            self._freed.add(block_id)
            freed += self.block_size
        return freed

    def take_freed(self) -> list[int]:
        """Store ids evicted since the last call that are still free: their memory can go back to the OS (an id
        reused at once, a full store recycling its oldest block, is not among them)."""
        freed, self._freed = sorted(self._freed), set()
        return freed

    def insert(self, keys: Seq[bytes], spare_tokens: int) -> list[tuple[int, int]]:
        """Take the blocks of `keys` (a sequence's prefix, in order) that are not cached yet, within
        `spare_tokens` of KV room plus what evicting older unpinned blocks frees. Returns (block index in the
        sequence, store block id) for each block to copy in; the blocks already cached are touched."""
        chain = [key for key in keys if key in self._blocks]
        self._pins.update(chain)  # neither this sequence's cached blocks nor its new ones make room for its tail
        copies = []
        for index, key in enumerate(keys):
            if key in self._blocks:
                continue
            if self._free and spare_tokens >= self.block_size:
                spare_tokens -= self.block_size
            elif not self.evict(self.block_size):  # an older block makes way: KV use does not grow
                break
            block_id = heapq.heappop(self._free)
            self._freed.discard(block_id)
            self._blocks[key] = block_id
            self._pins[key] += 1
            chain.append(key)
            copies.append((index, block_id))
        self._pins.subtract(chain)
        self._pins = +self._pins
        self._touch([key for key in keys if key in self._blocks])
        return copies
