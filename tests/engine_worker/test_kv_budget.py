"""KV sizing: from model geometry, concurrency, context length and free memory to a capacity, with the reason
logged; and the CPU buffers that commit memory only as sequences write them."""

from __future__ import annotations

import psutil
import pytest
import torch
from structlog.testing import capture_logs

from engine_worker.kv_budget import GIB, _cgroup_remaining, choose_kv_budget
from engine_worker.kv_memory import KVBuffers

SMOLLM2_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # 30 layers, 3 KV heads of 64, bf16: 22.5 KiB a token


def budget(**overrides):
    args = {"bytes_per_token": SMOLLM2_BYTES_PER_TOKEN, "max_model_len": 8192, "max_num_seqs": 64,
            "available_bytes": 20 * GIB, "cap_gib": 2.0} | overrides
    return choose_kv_budget(**args)


def test_small_needs_are_met_in_full() -> None:
    chosen = budget(max_num_seqs=4, max_model_len=1000)
    assert chosen.tokens == 4 * 1024  # each sequence its full (slot-aligned) length
    assert chosen.reason == "max_num_seqs x max_model_len"
    assert chosen.bytes == chosen.tokens * SMOLLM2_BYTES_PER_TOKEN


def test_worst_case_is_capped_at_kv_cache_gib() -> None:
    chosen = budget()  # 64 x 8192 tokens would be 11.25 GiB
    assert chosen.bytes <= 2 * GIB and chosen.tokens > 2 * GIB // SMOLLM2_BYTES_PER_TOKEN - 64
    assert chosen.tokens % 64 == 0
    assert chosen.reason == "capped by kv_cache_gib"
    assert budget(cap_gib=0.5).tokens < chosen.tokens


def test_a_small_machine_caps_below_kv_cache_gib() -> None:
    chosen = budget(available_bytes=1 * GIB)
    assert chosen.bytes <= 0.4 * GIB
    assert chosen.reason == "capped by available memory"
    assert budget(available_bytes=None).reason == "capped by kv_cache_gib"  # memory unknown: the cap alone


def test_always_holds_one_full_length_sequence() -> None:
    chosen = budget(available_bytes=64 * 2**20)
    assert chosen.tokens == 8192
    assert chosen.reason.endswith("raised to one max_model_len sequence")


def test_configured_tokens_win_over_memory() -> None:
    assert budget(configured_tokens=1000, max_model_len=512, available_bytes=1).tokens == 1024
    assert budget(configured_tokens=1000, max_model_len=512).reason == "configured (kv_cache_tokens)"
    assert budget(configured_tokens=100, max_model_len=512).tokens == 512


def test_rejects_nonsense_geometry() -> None:
    with pytest.raises(ValueError):
        budget(bytes_per_token=0)


def test_a_container_limit_lowers_the_available_memory(tmp_path) -> None:
    membership = tmp_path / "cgroup"
    membership.write_text("0::/inferq.slice\n")
    group = tmp_path / "inferq.slice"
    group.mkdir()
    (group / "memory.max").write_text(f"{3 * GIB}\n")
    (group / "memory.current").write_text(f"{GIB}\n")
    assert _cgroup_remaining(tmp_path, membership) == 2 * GIB
    (group / "memory.max").write_text("max\n")
    assert _cgroup_remaining(tmp_path, membership) is None
    membership.write_text("4:memory:/v1-only\n")
    assert _cgroup_remaining(tmp_path, membership) is None


def test_the_engine_logs_the_chosen_figure(engine_factory) -> None:
    with capture_logs() as logs:
        engine = engine_factory(max_num_seqs=3)
    sized = [entry for entry in logs if entry["event"] == "kv_cache.sized"]
    assert len(sized) == 1
    entry = sized[0]
    assert entry["kv_cache_tokens"] == engine.kv.capacity == 3 * 512  # tiny model: 512-token context
    assert entry["reason"] == "max_num_seqs x max_model_len" and entry["committed"] == "on demand"
    assert entry["available_gib"] > 0


def test_cpu_buffers_are_zero_and_commit_memory_only_when_written() -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    kv = KVBuffers(8, 32 * 2**20, torch.bfloat16, torch.device("cpu"))  # 8 x 64 MiB
    assert kv.lazy and len(kv.buffers) == 8
    assert all(buffer.numel() == 32 * 2**20 for buffer in kv.buffers)
    assert float(kv.buffers[3].float().abs().sum()) == 0.0  # reading never-written pages commits nothing
    assert process.memory_info().rss - before < 64 * 2**20
    kv.buffers[3][: 8 * 2**20].fill_(1.0)  # 16 MiB written
    grown = process.memory_info().rss - before
    assert 16 * 2**20 <= grown < 80 * 2**20
    assert float(kv.buffers[2][-10:].abs().sum()) == 0 and float(kv.buffers[4][:10].abs().sum()) == 0  # no overlap
