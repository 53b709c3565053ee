"""The prefix cache's books (engine_worker/prefix_cache.py) and its place in the KV accounting and the scheduler:
hits on whole blocks only, salting, LRU order, and eviction that gives way to running work but never takes
from it. Torch-free: sequences, the cache and the scheduler without a model."""

from __future__ import annotations

from contracts import SamplingParams
from engine_worker.kv_cache import KVCacheManager
from engine_worker.prefix_cache import BLOCK_SIZE, PrefixCache, block_keys
from engine_worker.scheduler import Scheduler
from engine_worker.sequence import Sequence, SequenceStatus

B = BLOCK_SIZE


def tokens(length: int, offset: int = 0) -> list[int]:
    return [1000 + offset * 7919 + i for i in range(length)]


def seq_of(token_ids: list[int], salt: str | None = None, arrival: int = 1, **params) -> Sequence:
    return Sequence(
        seq_id=arrival,
        request_id=f"r{arrival}",
        index=0,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        num_resume_tokens=0,
        params=SamplingParams(**params),
        max_tokens=16,
        sampling_key=0,
        priority=0,
        arrival=arrival,
        eos_token_ids=frozenset(),
        detokenizer=None,  # type: ignore[arg-type]
        cache_keys=block_keys(token_ids, salt),
    )


def cache_with(cache: PrefixCache, token_ids: list[int], salt: str | None = None) -> None:
    copies = cache.insert(block_keys(token_ids, salt), spare_tokens=10**9)
    assert copies, "nothing was cached"


def test_keys_chain_whole_blocks_and_name_the_whole_prefix() -> None:
    a = block_keys(tokens(3 * B + 5), None)
    assert len(a) == 3  # the partial fourth block has no key
    b = block_keys(tokens(2 * B) + [7] * B, None)
    assert a[:2] == b[:2] and a[2] != b[2]
    # The same block after a different first block is a different key: a key names the prefix, not the block.
    c = block_keys([5] + tokens(2 * B)[1:] + tokens(3 * B)[2 * B :], None)
    assert c[2] != a[2]


def test_a_hit_is_the_longest_cached_run_of_whole_blocks() -> None:
    cache = PrefixCache(num_blocks=16)
    cache_with(cache, tokens(3 * B))
    # Same 3 blocks then more: 3 blocks hit.
    assert cache.lookup(seq_of(tokens(3 * B) + [5] * 20)).num_tokens == 3 * B
    # A prompt sharing 2.5 blocks: only the 2 whole shared blocks hit.
    shared = tokens(2 * B + B // 2) + [9] * (B // 2 + 10)
    assert cache.lookup(seq_of(shared)).num_tokens == 2 * B
    # Exactly the cached prompt: its last token is computed anyway (the step samples from it), so one block less.
    assert cache.lookup(seq_of(tokens(3 * B))).num_tokens == 2 * B
    # Shorter than one block: nothing.
    assert cache.lookup(seq_of(tokens(B - 1))).num_tokens == 0


def test_the_salt_partitions_the_cache() -> None:
    cache = PrefixCache(num_blocks=16)
    cache_with(cache, tokens(4 * B), salt="owner-a")
    assert cache.lookup(seq_of(tokens(5 * B), salt="owner-a")).num_tokens == 4 * B
    assert cache.lookup(seq_of(tokens(5 * B), salt="owner-b")).num_tokens == 0
    assert cache.lookup(seq_of(tokens(5 * B), salt=None)).num_tokens == 0


def test_lru_evicts_the_least_recently_used_chain_from_its_tail() -> None:
    cache = PrefixCache(num_blocks=6)
    cache_with(cache, tokens(2 * B, offset=1))  # old
    cache_with(cache, tokens(2 * B, offset=2))
    cache.release(cache.lookup(seq_of(tokens(2 * B + 1, offset=1))))  # offset 1 used again: now the newest
    assert cache.evict(B) == B
    # The least recently used chain (offset 2) lost its tail first; its root is still there.
    assert cache.lookup(seq_of(tokens(2 * B + 1, offset=2))).num_tokens == B
    assert cache.lookup(seq_of(tokens(2 * B + 1, offset=1))).num_tokens == 2 * B


def test_pinned_blocks_are_not_evicted_and_a_full_store_recycles_old_blocks() -> None:
    cache = PrefixCache(num_blocks=2)
    cache_with(cache, tokens(2 * B, offset=1))
    hit = cache.lookup(seq_of(tokens(2 * B + 1, offset=1)))
    assert cache.evictable_tokens == 0 and cache.evict(B) == 0
    assert cache.insert(block_keys(tokens(B, offset=3), None), spare_tokens=10**9) == []  # no room: all pinned
    cache.release(hit)
    copies = cache.insert(block_keys(tokens(B, offset=3), None), spare_tokens=0)  # an old block makes way
    assert len(copies) == 1 and cache.num_tokens == 2 * B


def test_insert_takes_only_spare_room_and_never_duplicates() -> None:
    cache = PrefixCache(num_blocks=8)
    keys = block_keys(tokens(4 * B), None)
    assert [index for index, _ in cache.insert(keys, spare_tokens=2 * B)] == [0, 1]  # room for two blocks
    assert [index for index, _ in cache.insert(keys, spare_tokens=5 * B)] == [2, 3]  # the two cached are kept
    assert cache.insert(keys, spare_tokens=5 * B) == []


def _scheduler(capacity: int, cache: PrefixCache) -> Scheduler:
    kv = KVCacheManager(capacity, max_num_seqs=4, max_model_len=capacity, prefix_cache=cache)
    return Scheduler(4, 4096, kv)


def test_admission_loads_the_hit_and_computes_from_the_first_uncached_token() -> None:
    cache = PrefixCache(num_blocks=16)
    scheduler = _scheduler(1024, cache)
    cache_with(cache, tokens(3 * B))
    seq = seq_of(tokens(3 * B) + [4] * 10)
    scheduler.add(seq)
    out = scheduler.schedule()
    assert out.scheduled == [(seq, 10)] and seq.num_computed_tokens == 3 * B
    assert [hit.seq for hit in out.cache_loads] == [seq] and len(out.cache_loads[0].block_ids) == 3
    assert seq.num_cached_tokens == 3 * B
    assert (cache.queries_total, cache.hits_total) == (3 * B + 10, 3 * B)


def test_prompt_logprobs_requests_compute_their_whole_prompt() -> None:
    cache = PrefixCache(num_blocks=16)
    scheduler = _scheduler(1024, cache)
    cache_with(cache, tokens(3 * B))
    seq = seq_of(tokens(3 * B) + [4] * 10, prompt_logprobs=1)
    scheduler.add(seq)
    out = scheduler.schedule()
    assert out.scheduled == [(seq, 3 * B + 10)] and not out.cache_loads


def test_running_work_evicts_cached_blocks_before_anyone_is_preempted() -> None:
    # 256 tokens of KV; the store holds 128 of them. Two sequences that grow need the room.
    cache = PrefixCache(num_blocks=8)
    scheduler = _scheduler(256, cache)
    cache_with(cache, tokens(4 * B, offset=9))
    assert cache.num_tokens == 4 * B
    seqs = [seq_of(tokens(40, offset=i), arrival=i + 1) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.postprocess(scheduler.schedule())
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)  # 2 x 64 + 128 cached = 256: both fit
    for seq in seqs:  # grow both past one 64-token slot: 2 x 128 needs the cached tokens' room
        seq.token_ids += [3] * 60
    out = scheduler.schedule()
    assert not out.preempted and cache.num_tokens == 0
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)


def test_cached_blocks_never_push_out_running_work_and_wait_for_room() -> None:
    """A finished sequence's blocks go only into room nothing running holds (spare_tokens)."""
    cache = PrefixCache(num_blocks=8)
    scheduler = _scheduler(256, cache)
    seqs = [seq_of(tokens(100, offset=i), arrival=i + 1) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.postprocess(scheduler.schedule())
    assert scheduler.kv.spare_tokens == 0  # two 128-token slots fill the 256 tokens
    assert cache.insert(block_keys(tokens(4 * B, offset=7), None), scheduler.kv.spare_tokens) == []
    scheduler.finish(seqs[1])
    assert scheduler.kv.spare_tokens == 128
    assert len(cache.insert(seqs[1].cache_keys, scheduler.kv.spare_tokens)) == 3  # its 3 whole blocks


def test_evicted_blocks_are_handed_back_unless_reused_at_once() -> None:
    cache = PrefixCache(num_blocks=4)
    cache_with(cache, tokens(2 * B, offset=1))  # store ids 0, 1
    cache_with(cache, tokens(2 * B, offset=2))  # store ids 2, 3
    assert cache.take_freed() == []
    # A full store recycles its least recently used block (offset 1's tail) for a new one: nothing to give back.
    assert cache.insert(block_keys(tokens(B, offset=3), None), spare_tokens=10**9) == [(0, 1)]
    assert cache.take_freed() == []
    # Running work that needs room evicts two more; their memory can go, once.
    assert cache.evict(2 * B) == 2 * B
    assert cache.take_freed() == [0, 3]
    assert cache.take_freed() == []
