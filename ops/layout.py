"""The default layout of `inferq serve` on one machine: how many engine workers per model and how many torch
threads each, for `INFERQ_WORKERS_PER_MODEL=auto` (the default is one worker: see docs/benchmarks.md).

The rule, from the measurements in docs/benchmarks.md ("The default layout"): on a CPU, one single-thread worker
per core beats one worker using every core (2 cores, SmolLM2-135M: 2 workers x 1 thread gave 351 tok/s at 32
streams against 250 for 1 x 1, and the same at 1 stream; 1 worker x 2 threads was slower than 1 x 1 at every
concurrency, because each step's parallel regions wait for a thread the api or NATS preempted). Each worker
holds its own weights and KV cache, so the count is bounded by memory: the workers' estimated peak may use at
most half of the memory available at start. A GPU (or an unknown model size) keeps one worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
MAX_AUTO_WORKERS = 8  # past this, per-worker batches get small and the edge becomes the limit (not measured)
MEMORY_SHARE = 0.5  # of the memory available at start, for all workers' estimated peaks together
RUNTIME_BYTES = 400 * 2**20  # torch, tokenizer and Python per worker (measured ~220 MB of torch alone)
GGUF_EXPANSION = 7  # a 4-bit GGUF dequantized to fp32 (the worst case: CPUs without native bf16)
SAFETENSORS_EXPANSION = 2  # bf16 checkpoints loaded as fp32 (worst case)


@dataclass(frozen=True, slots=True)
class Layout:
    workers: int
    threads: int
    reason: str


def choose_layout(cores: int, available_bytes: int, worker_bytes: int | None, *, gpu: bool) -> Layout:
    """Workers x threads for one model on this machine (see the module docstring for why)."""
    if gpu:
        return Layout(1, threads_per_worker(cores, 1), "a GPU: one worker holds the model and its KV cache")
    if worker_bytes is None:
        return Layout(1, threads_per_worker(cores, 1), "model size unknown: one worker")
    by_memory = int(available_bytes * MEMORY_SHARE // max(worker_bytes, 1))
    workers = max(1, min(cores, MAX_AUTO_WORKERS, by_memory))
    reason = f"one single-thread worker per core ({cores})"
    if workers < min(cores, MAX_AUTO_WORKERS):
        reason = f"memory: {workers} x ~{worker_bytes / GIB:.1f} GiB within half of {available_bytes / GIB:.1f} GiB"
    elif cores > MAX_AUTO_WORKERS:
        reason = f"at most {MAX_AUTO_WORKERS} workers, the cores shared between them"
    return Layout(workers, threads_per_worker(cores, workers), reason)


def threads_per_worker(cores: int, workers: int) -> int:
    """torch threads per worker when the api and NATS share the machine: one core left to them, the rest split
    between the workers. An engine using every core runs one OpenMP thread per core, and each parallel region
    waits for the slowest thread; whenever the api, NATS or a client wakes, one thread is preempted and the
    whole step waits. On 2 cores that made decode steps 1.5-2x slower than with one thread."""
    return max(1, (cores - 1) // max(1, workers))


def estimate_worker_bytes(model_files: list[Path], kv_cache_gib: float, prefix_store_mib: float = 0.0) -> int | None:
    """A worker's peak: its weights as loaded, the KV capacity (committed as used, bounded by kv_cache_gib), the
    prefix store's bound (its blocks are committed as conversations fill it) and the runtime; None when the
    model's files are not on this machine (a hub id not downloaded yet). The weights are counted as fp32, the
    worst case: a CPU with native bf16 or fp16 weights (weight_quant) holds half of that."""
    weights = 0
    for path in model_files:
        if path.suffix == ".gguf":
            weights += path.stat().st_size * GGUF_EXPANSION
        elif path.suffix in (".safetensors", ".bin"):
            weights += path.stat().st_size * SAFETENSORS_EXPANSION
    if not weights:
        return None
    return weights + int(kv_cache_gib * GIB) + int(prefix_store_mib * 2**20) + RUNTIME_BYTES


def weight_files(spec: Path) -> list[Path]:
    """The weight files of a local model: a .gguf, or a directory's .gguf/.safetensors/.bin files."""
    if spec.is_file():
        return [spec]
    if spec.is_dir():
        return sorted(p for p in spec.iterdir() if p.suffix in (".gguf", ".safetensors", ".bin"))
    return []


def has_gpu(device: str) -> bool:
    """Without importing torch (the launcher stays light): an explicit cuda device, or NVIDIA's device node."""
    if device.startswith(("cuda", "xpu", "mps")):
        return True
    return device == "auto" and Path("/dev/nvidiactl").exists()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))
