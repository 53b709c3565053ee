"""`/v1/gpu/info` and the GPU count in `/health`: the devices live workers report in the registry (read from
torch on the worker at its last heartbeat), never assumed."""

from __future__ import annotations

from collections.abc import Sequence

from contracts import WorkerInfo


def _device_key(worker: WorkerInfo) -> tuple[str, str, int | None]:
    return worker.host, worker.device.kind, worker.device.index


def _distinct(workers: Sequence[WorkerInfo], *, cuda: bool) -> dict[tuple, list[WorkerInfo]]:
    """Workers grouped by the device they run on (several workers may share one GPU or one host's CPU)."""
    groups: dict[tuple, list[WorkerInfo]] = {}
    for worker in sorted(workers, key=lambda w: (w.host, w.device.index or 0, w.worker_id)):
        if (worker.device.kind == "cuda") == cuda:
            groups.setdefault(_device_key(worker), []).append(worker)
    return groups


def gpu_count(workers: Sequence[WorkerInfo]) -> int:
    return len(_distinct(workers, cuda=True))


def gpu_info(workers: Sequence[WorkerInfo]) -> dict:
    """CUDA devices under `gpus` (DeepInfer fields, plus where they are and what runs on them); CPU-only
    workers' processors under `cpu`."""
    gpus = []
    for (host, _, index), group in _distinct(workers, cuda=True).items():
        device = max(group, key=lambda w: w.updated_at).device  # the freshest memory reading
        gpus.append(
            {
                "id": index,
                "name": device.name,
                "total_memory_gb": device.total_memory_gb,
                "free_memory_gb": device.free_memory_gb,
                "compute_capability": device.compute_capability,
                "driver_version": device.driver_version,
                "cuda_version": device.cuda_version,
                "is_nvidia_5090": "5090" in device.name,
                "is_nvidia_4090": "4090" in device.name,
                **_placement(host, group),
            }
        )
    cpu = [
        {"name": group[0].device.name, **_placement(host, group)}
        for (host, _, _), group in _distinct(workers, cuda=False).items()
    ]
    return {"gpus": gpus, "cpu": cpu}


def _placement(host: str, group: Sequence[WorkerInfo]) -> dict:
    return {"host": host, "models": sorted({w.model for w in group}), "workers": [w.worker_id for w in group]}
