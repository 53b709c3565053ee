"""KV cache accounting: slots in one buffer whose size is a token capacity (kv_budget.py picks it; on a CPU the
memory behind it is committed as slots are written, kv_memory.py).

Why slots: on CPU, decode attention as a `bmm` over a contiguous per-slot cache is ~13x faster than masked SDPA
or a gathered paged layout (reference/engine_cpu.md). Why a variable slot length: a fixed slot of
`max_model_len` tokens would need max_num_seqs x max_model_len memory (12 GiB in bf16 for SmolLM2 at 64 x 8192).

So the runner maps, per layer, one buffer of `capacity` tokens once, and views it as
`[capacity // slot_len, kv_heads, slot_len, head_dim]`. `slot_len` is one of a ladder of lengths (64, 128, 192,
256, 320, ... 512, 640, 768, 960, ...: multiples of 64, each about a quarter longer than the last; capped at the
model length) and tracks the longest running sequence: it steps up when a sequence outgrows it and down as soon
as the longest one fits a shorter slot. Each change is a `Relayout` (running sequences are copied into
compacted slots 0..B-1 of the new view), which happens O(log max_model_len) times over a sequence's life.
Decode attention reads whole slots: a window shorter than the slot makes the bmm batch strided, which costs
bf16 on CPU 3-6x (measured). So the ladder is fine-grained: attention reads at most ~25% (or 64 tokens) more
than the longest sequence needs, where doubling slot lengths read up to 2x (5-8% of a batch-32 decode step on
CPU, docs/benchmarks.md), at the price of a few more relayouts.

Accounting follows the layout: a set of running sequences fits when `len(running) * slot_len <= capacity`,
where slot_len covers the longest of them. This is the same B x L_max that batched decode attention computes
over, so memory and attention work are bounded by the same number. Cached prefix blocks (prefix_cache.py) count
against the same capacity: running work that needs their room evicts them (least recently used first) before
anything is preempted. Nothing here imports torch; the runner applies relayouts to its tensors.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine_worker.sequence import Sequence

if TYPE_CHECKING:
    from engine_worker.prefix_cache import PrefixCache

SLOT_ALIGN = 64  # attention windows and slot lengths are multiples of this


def round_up(value: int, multiple: int = SLOT_ALIGN) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True, slots=True)
class Relayout:
    """Switch the cache view to `slot_len`; copy the first `copy_len` tokens of each (old, new) slot pair."""

    old_slot_len: int
    slot_len: int
    moves: list[tuple[int, int]]
    copy_len: int


def _slot_ladder(max_slot_len: int) -> tuple[int, ...]:
    """Slot lengths 64, 128, 192, ...: multiples of 64, each about a quarter longer than the last, ending at
    `max_slot_len`."""
    ladder = [SLOT_ALIGN]
    while ladder[-1] < max_slot_len:
        ladder.append(ladder[-1] + max(SLOT_ALIGN, ladder[-1] // 4 // SLOT_ALIGN * SLOT_ALIGN))
    return (*ladder[:-1], max_slot_len)


class KVCacheManager:
    def __init__(
        self, capacity: int, max_num_seqs: int, max_model_len: int, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.max_slot_len = round_up(max_model_len)
        self._ladder = _slot_ladder(self.max_slot_len)
        if capacity < self.max_slot_len:
            raise ValueError(f"KV capacity {capacity} tokens cannot hold one {max_model_len}-token sequence")
        self.capacity = capacity
        self.max_num_seqs = max_num_seqs
        self.slot_len = self._level(1)  # changes only in `commit`, together with the runner's view
        self._reserved: dict[Sequence, int] = {}  # running sequence -> KV tokens it may hold after this step
        self._free_slots: list[int] = list(range(self.num_slots))
        self._new: list[Sequence] = []  # allocated this step, slot assigned in `commit`
        self.prefix_cache = prefix_cache  # its blocks share the capacity and give way to running sequences

    # --- layout ---------------------------------------------------------------------------------------------
    def _level(self, num_tokens: int) -> int:
        """Smallest slot length on the ladder holding `num_tokens` (the longest slot beyond it)."""
        return self._ladder[min(bisect.bisect_left(self._ladder, num_tokens), len(self._ladder) - 1)]

    def slots_for(self, slot_len: int) -> int:
        return min(self.max_num_seqs, self.capacity // slot_len)

    @property
    def num_slots(self) -> int:
        return self.slots_for(self.slot_len)

    @property
    def num_running(self) -> int:
        return len(self._reserved)

    @property
    def usage(self) -> float:
        return self.num_running * self.slot_len / self.capacity

    @property
    def num_reserved_tokens(self) -> int:
        return sum(self._reserved.values())

    @property
    def num_cached_tokens(self) -> int:
        return 0 if self.prefix_cache is None else self.prefix_cache.num_tokens

    @property
    def spare_tokens(self) -> int:
        """Capacity that neither the running sequences' slots nor cached blocks take: room to cache more."""
        footprint = self.num_running * self._level(self._longest()) if self._reserved else 0
        return max(0, self.capacity - footprint - self.num_cached_tokens)

    def _fits(self, num_seqs: int, longest: int) -> bool:
        """Whether `num_seqs` slots of the length `longest` needs fit, evicting cached prefix blocks for room
        (never the other way round: cached blocks do not displace running work)."""
        level = self._level(longest)
        if num_seqs > self.slots_for(level):
            return False
        over = num_seqs * level + self.num_cached_tokens - self.capacity
        cache = self.prefix_cache
        if cache is not None and 0 < over <= cache.evictable_tokens:
            cache.evict(over)
            over = num_seqs * level + self.num_cached_tokens - self.capacity
        return over <= 0

    def _longest(self) -> int:
        return max(self._reserved.values(), default=0)

    # --- paired checks and actions ----------------------------------------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        """Could a new sequence join the running set with `num_tokens` of KV?"""
        return self._fits(self.num_running + 1, max(self._longest(), num_tokens))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        assert seq not in self._reserved
        self._reserved[seq] = num_tokens
        self._new.append(seq)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self._fits(self.num_running, max(self._longest(), self._reserved[seq] + num_tokens))

    def append(self, seq: Sequence, num_tokens: int) -> None:
        self._reserved[seq] += num_tokens

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Hold only `num_tokens` (rejected draft tokens give theirs back)."""
        self._reserved[seq] = min(self._reserved[seq], num_tokens)

    def free(self, seq: Sequence) -> None:
        self._reserved.pop(seq)
        if seq in self._new:
            self._new.remove(seq)
        elif seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)
        seq.slot = None

    def commit(self) -> Relayout | None:
        """End of a scheduling pass: assign slots to new sequences. When the longest sequence needs another
        slot length (longer, or half as long now that a long one left), re-view the cache and compact."""
        new, self._new = self._new, []
        target = self._level(self._longest()) if self._reserved else self.slot_len
        if target == self.slot_len:
            for seq in new:
                seq.slot = heapq.heappop(self._free_slots)
            return None
        old_slot_len, self.slot_len = self.slot_len, target
        running = sorted(self._reserved, key=lambda s: s.key)
        moves = [(s.slot, i) for i, s in enumerate(running) if s.slot is not None and s.num_computed_tokens]
        longest_computed = max((s.num_computed_tokens for s in running), default=1)
        copy_len = min(old_slot_len, self.slot_len, round_up(longest_computed))
        for i, seq in enumerate(running):
            seq.slot = i
        self._free_slots = list(range(len(running), self.num_slots))
        return Relayout(old_slot_len=old_slot_len, slot_len=self.slot_len, moves=moves, copy_len=copy_len)
