"""KV sizing: from model geometry, concurrency, context length and free memory to a capacity, with the reason
logged; and the CPU buffers that commit memory only as sequences write them."""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from structlog.testing import capture_logs

from engine_worker.kv_budget import GIB, _cgroup_remaining, choose_kv_budget
from engine_worker.kv_memory import KVBuffers, trim_heap
from engine_worker.outputs import EngineStats
from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion, tokens_by_choice

SMOLLM2_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # 30 layers, 3 KV heads of 64, bf16: 22.5 KiB a token


def budget(**overrides):
    args = {
        "bytes_per_token": SMOLLM2_BYTES_PER_TOKEN,
        "max_model_len": 8192,
        "max_num_seqs": 64,
        "available_bytes": 20 * GIB,
        "cap_gib": 2.0,
    } | overrides
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


def test_released_buffers_give_memory_back_and_read_as_zeros() -> None:
    process = psutil.Process()
    kv = KVBuffers(2, 16 * 2**20, torch.float32, torch.device("cpu"))  # 2 x 64 MiB
    for buffer in kv.buffers:
        buffer.fill_(3.0)
    full = process.memory_info().rss
    kv.release()
    assert full - process.memory_info().rss >= 100 * 2**20
    assert all(float(buffer.abs().sum()) == 0.0 for buffer in kv.buffers)


def test_an_engine_that_released_its_kv_generates_the_same(engine_factory) -> None:
    engine = engine_factory(max_num_seqs=2)

    def generate(request_id: str) -> dict[int, list[int]]:
        engine.add_request(make_request(request_id, prompt_of(80), max_tokens=12, ignore_eos=True, temperature=0.0))
        return tokens_by_choice(run_to_completion(engine)[request_id])

    first = generate("a")
    assert any(float(buffer.abs().sum()) for buffer in engine.runner.k_cache)
    engine.release_idle_memory()
    assert all(float(buffer.abs().sum()) == 0.0 for buffer in engine.runner.k_cache)
    assert generate("b") == first and len(first[0]) == 12


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_trim_heap_gives_back_what_a_thread_freed_below_its_arena_top() -> None:
    """A step's activations are freed when it ends, but glibc keeps freed chunks below the top of the engine
    thread's arena resident: only `malloc_trim` returns them."""
    import threading

    kept: list[bytearray] = []

    def burst() -> None:  # ~190 MiB in chunks under the mmap threshold, then all freed but the last one
        chunks = [bytearray(b"x" * 60_000) for _ in range(3200)]
        kept.append(chunks[-1])  # pins the arena's top, so glibc cannot shrink it by itself
        del chunks

    worker = threading.Thread(target=burst)
    worker.start()
    worker.join()
    before = _rss()
    trim_heap()
    assert before - _rss() >= 100 * 2**20
    assert kept[0][:1] == b"x"


def test_an_idle_release_trims_the_heap(engine_factory, monkeypatch) -> None:
    from engine_worker import model_runner

    engine = engine_factory(max_num_seqs=2)
    trims: list[bool] = []
    monkeypatch.setattr(model_runner, "trim_heap", lambda: trims.append(True))
    engine.release_idle_memory()
    assert trims == [True]


class _IdleEngine:
    """Counts releases; `busy` steps are pending before it goes idle."""

    def __init__(self, busy: int) -> None:
        self.busy, self.steps, self.releases = busy, 0, []

    def has_unfinished_requests(self) -> bool:
        return self.steps < self.busy

    def step(self) -> list:
        self.steps += 1
        return []

    def stats(self) -> EngineStats:
        return EngineStats(running=int(self.has_unfinished_requests()), waiting=0)

    def release_idle_memory(self) -> None:
        self.releases.append((time.monotonic(), self.steps))


def test_the_engine_loop_releases_memory_once_after_an_idle_pause(monkeypatch) -> None:
    from engine_worker import engine_loop

    monkeypatch.setattr(engine_loop, "RELEASE_MEMORY_AFTER_IDLE_S", 0.3)
    engine = _IdleEngine(busy=5)
    loop = engine_loop.EngineLoop(engine, lambda outputs, stats: None, lambda rid, exc: None, lambda exc: None)
    started = time.monotonic()
    loop.start()
    deadline = started + 30
    while not engine.releases and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # an idle second more: no second release
    loop.stop()
    assert len(engine.releases) == 1
    released_at, steps = engine.releases[0]
    assert steps == 5 and released_at - started >= 0.3  # after every step, and after the pause
