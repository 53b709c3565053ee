"""Continuous (iteration-level) batching. There are no prefill and decode phases: each step gives every
scheduled sequence a number of tokens (a whole prompt, a chunk of one, or 1 to decode) within a token budget
(`max_num_batched_tokens`) and a sequence budget (`max_num_seqs`), against the KV capacity.

Order of a step: running sequences first (lower `priority`, then earlier arrival), so streams keep flowing;
budget is held back for every decode so a long prompt chunk never starves them; then waiting sequences are
admitted while their whole known length fits the KV cache. When a running sequence cannot grow, the
lowest-ranked running sequence is preempted: its KV is freed and it is requeued at the front of its priority
class (it keeps its arrival number) to be recomputed later. Nothing is ever failed for lack of memory.
Choices 1..n-1 of a request wait until choice 0 has computed the prompt, then copy its KV (`forks`) and compute
only the last prompt token themselves. A decode may also carry draft tokens (speculative.py) in budget and KV
that nothing else needs; the ones the sampler rejects are rolled back after the step (`reject_drafts`).
A sequence admitted without a fork looks its prompt up in the prefix cache (prefix_cache.py): the cached blocks
are copied into its slot before the step's forward (`cache_loads`) and it computes only from the first uncached
token. A sequence that wants prompt logprobs computes its whole prompt (the cache holds KV, not logits).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from engine_worker.kv_cache import KVCacheManager, Relayout
from engine_worker.prefix_cache import CacheHit
from engine_worker.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    relayout: Relayout | None = None
    preempted: list[Sequence] = field(default_factory=list)
    forks: list[tuple[Sequence, Sequence, int]] = field(default_factory=list)  # copy KV (from, to, tokens)
    cache_loads: list[CacheHit] = field(default_factory=list)  # cached prefix blocks to copy into new slots

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, kv: KVCacheManager) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv = kv
        self.waiting: deque[Sequence] = deque()  # sorted by Sequence.key
        self.running: deque[Sequence] = deque()  # sorted by Sequence.key
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        _insort(self.waiting, seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes_left = sum(1 for seq in self.running if not seq.is_prefill)
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this pass
                continue
            is_decode = not seq.is_prefill
            decodes_left -= is_decode
            num_tokens = min(seq.num_uncomputed_tokens, budget - (0 if is_decode else decodes_left))
            if num_tokens <= 0:
                continue
            while not self.kv.can_append(seq, num_tokens):
                victim = self.running[-1]
                decodes_left -= victim is not seq and not victim.is_prefill
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.kv.append(seq, num_tokens)
                out.scheduled.append((seq, num_tokens))
                budget -= num_tokens
        if not out.preempted:
            budget = self._admit(out, budget)
        self._add_drafts(out, budget)
        out.relayout = self.kv.commit()
        return out

    def _add_drafts(self, out: SchedulerOutput, budget: int) -> None:
        """Draft tokens ride on decodes in the budget and KV left over once everything else is scheduled: a
        guess never delays a prompt, a decode or an admission, and never preempts anyone."""
        for i, (seq, num_tokens) in enumerate(out.scheduled):
            drafts = seq.draft_token_ids
            if not drafts:
                continue
            if num_tokens != seq.num_uncomputed_tokens or seq.is_prefill:  # a prompt chunk or a recompute
                drafts.clear()
                continue
            del drafts[max(0, budget) :]
            if drafts and self.kv.can_append(seq, len(drafts)):
                self.kv.append(seq, len(drafts))
                out.scheduled[i] = (seq, num_tokens + len(drafts))
                budget -= len(drafts)
            else:
                drafts.clear()

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Start waiting sequences while budget, slots and KV allow; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            shared = self._shared_prefix(seq)
            if shared is None:
                break  # its parent is still computing the prompt it will copy
            hit = self._cache_hit(seq) if not shared else None
            # Admit only when the whole known length fits, so admission does not lead straight to preemption.
            if not self._can_allocate(seq, hit):
                break
            if hit is not None:
                self.kv.prefix_cache.count(hit)
            if hit is not None and hit.block_ids:
                out.cache_loads.append(hit)
                shared = hit.num_tokens
                if not seq.num_preemptions:
                    seq.num_cached_tokens = shared
            self.waiting.popleft()
            seq.num_computed_tokens = shared
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            self.kv.allocate(seq, shared + num_tokens)
            seq.status = SequenceStatus.RUNNING
            _insort(self.running, seq)
            out.scheduled.append((seq, num_tokens))
            if shared and hit is None:
                out.forks.append((seq.parent, seq, shared))
            budget -= num_tokens
        return budget

    def _cache_hit(self, seq: Sequence) -> CacheHit | None:
        cache = self.kv.prefix_cache
        if cache is None or seq.needs_prompt_logprobs:
            return None
        return cache.lookup(seq)

    def _can_allocate(self, seq: Sequence, hit: CacheHit | None) -> bool:
        """Room for `seq`; its pinned hit may be what blocks it (a long prompt whose cached prefix fills the room
        it needs): then it is admitted without the hit, which `hit` no longer holds."""
        if self.kv.can_allocate(seq.num_tokens + 1):
            return True
        cache = self.kv.prefix_cache
        if hit is None or cache is None:
            return False
        cache.release(hit)
        return self.kv.can_allocate(seq.num_tokens + 1)

    @staticmethod
    def _shared_prefix(seq: Sequence) -> int | None:
        """Prompt tokens whose KV a choice can copy from choice 0 instead of computing (all but the last,
        whose logits it samples from); None to wait for choice 0 to get there."""
        parent, shared = seq.parent, seq.num_prompt_tokens - 1
        if parent is None or shared < 1 or parent.status is not SequenceStatus.RUNNING:
            return 0
        return shared if parent.num_computed_tokens >= shared else None

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft_token_ids.clear()
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def postprocess(self, out: SchedulerOutput) -> None:
        """The step ran: the scheduled tokens now have KV."""
        for seq, num_tokens in out.scheduled:
            seq.num_computed_tokens += num_tokens

    def reject_drafts(self, seq: Sequence, num_rejected: int) -> None:
        """The last `num_rejected` tokens computed this step were wrong guesses: their KV is garbage that the
        next step overwrites."""
        seq.draft_token_ids.clear()
        if num_rejected and seq.status is SequenceStatus.RUNNING:
            seq.num_computed_tokens -= num_rejected
            self.kv.shrink(seq, seq.num_computed_tokens)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its KV at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED


def _insort(queue: deque[Sequence], seq: Sequence) -> None:
    queue.insert(bisect.bisect_right(queue, seq.key, key=lambda s: s.key), seq)
