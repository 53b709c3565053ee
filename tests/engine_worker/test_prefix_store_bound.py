"""The prefix store's memory bound (issue #22): sized from `prefix_cache_max_mib` (never more than a quarter of the
KV capacity) and logged at start, never holding more blocks or resident memory than that, keeping the most
recently used prefixes when it is full, and handing the pages of blocks that running work evicts back to the OS.
Engines on the tiny random llama (fp32: 512 bytes of KV a token, 16 KiB a 32-token block)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from engine_worker.prefix_cache import BLOCK_SIZE as B
from engine_worker.prefix_caching import MIB, choose_store_size
from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion
from tests.engine_worker.resident import store_resident_bytes

TINY_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
SMOLLM2_FP32_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # 45 KiB a token: 1.4 MiB a block


def cached_tokens(engine, name: str, prompt: list[int], max_tokens: int = 1) -> int:
    engine.add_request(make_request(name, prompt, temperature=0.0, max_tokens=max_tokens))
    return run_to_completion(engine)[name][-1].usage.cached_tokens


def test_the_store_is_the_memory_bound_or_a_quarter_of_the_capacity_whichever_is_smaller() -> None:
    default = choose_store_size(capacity=46_592, bytes_per_token=SMOLLM2_FP32_BYTES_PER_TOKEN, max_mib=64)
    assert default.blocks == 64 * MIB // (SMOLLM2_FP32_BYTES_PER_TOKEN * B) == 45  # not 364, a quarter
    assert default.reason == "prefix_cache_max_mib"
    small_capacity = choose_store_size(capacity=2048, bytes_per_token=SMOLLM2_FP32_BYTES_PER_TOKEN, max_mib=128)
    assert (small_capacity.blocks, small_capacity.reason) == (16, "a quarter of the KV capacity")
    assert choose_store_size(capacity=46_592, bytes_per_token=SMOLLM2_FP32_BYTES_PER_TOKEN, max_mib=0.5).blocks == 1


def test_a_full_store_keeps_the_most_recent_prefixes_within_its_bound(engine_factory) -> None:
    with capture_logs() as logs:
        engine = engine_factory(prefix_cache_max_mib=4 * B * TINY_BYTES_PER_TOKEN / MIB)  # four blocks
    sized = [entry for entry in logs if entry["event"] == "prefix_cache.sized"]
    assert len(sized) == 1 and sized[0]["blocks"] == 4 and sized[0]["reason"] == "prefix_cache_max_mib"
    cache, store = engine.prefix.cache, engine.runner.prefix_store
    assert cache.num_blocks == 4 and store.shape[0] == 4
    prompts = {name: prompt_of(2 * B + 6, offset) for offset, name in enumerate("abcd", start=1)}  # 2 blocks each
    for name in "abc":
        assert cached_tokens(engine, name, prompts[name]) == 0
        assert cache.num_tokens <= 4 * B
    # "a" was the least recently used: "b" and "c" are still there, "a" made way.
    assert cached_tokens(engine, "c2", prompts["c"]) == 2 * B  # a hit after the others' eviction
    assert cached_tokens(engine, "b2", prompts["b"]) == 2 * B
    assert cached_tokens(engine, "a2", prompts["a"]) == 0
    # "a" came back in place of "c", now the least recently used; "b" stays.
    assert cached_tokens(engine, "b3", prompts["b"]) == 2 * B
    assert cached_tokens(engine, "c3", prompts["c"]) == 0
    assert cache.num_tokens == 4 * B


def test_blocks_evicted_for_running_work_go_back_to_the_os(engine_factory) -> None:
    engine = engine_factory(kv_cache_tokens=512, prefix_cache_max_mib=1)  # the store: a quarter, 4 blocks
    store = engine.runner.prefix_store
    if store_resident_bytes(store) is None:
        pytest.skip("mincore is not available here")
    assert engine.prefix.cache.num_blocks == 4
    assert cached_tokens(engine, "short", prompt_of(4 * B + 2, 1)) == 0
    assert engine.prefix.cache.num_tokens == 4 * B and store_resident_bytes(store) == 4 * store.bytes_per_block
    # A 450-token prompt needs the whole 512-token capacity: its admission evicts every cached block, whose
    # pages are handed back before the step's forward.
    engine.add_request(make_request("long", prompt_of(450, 2), temperature=0.0, max_tokens=3))
    engine.step()
    assert engine.has_unfinished_requests()  # still running: its slot holds the room the store gave up
    assert engine.prefix.cache.num_tokens == 0 and store_resident_bytes(store) == 0
    run_to_completion(engine)
    # Its own prompt is cached when it ends, committing the blocks anew.
    assert engine.prefix.cache.num_tokens == 4 * B and store_resident_bytes(store) == 4 * store.bytes_per_block
