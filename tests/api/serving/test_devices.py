"""`/v1/gpu/info` and the `/health` GPU count come from the devices workers registered."""

from __future__ import annotations

from api.serving.devices import gpu_count, gpu_info
from contracts import DeviceInfo, WorkerInfo


def worker(worker_id: str, device: DeviceInfo, *, host: str = "h1", model: str = "m", updated_at: float = 1.0):
    return WorkerInfo(
        worker_id=worker_id,
        model=model,
        model_source="/models/m",
        max_model_len=512,
        capacity=8,
        device=device,
        dtype="bfloat16",
        host=host,
        pid=1,
        started_at=0.0,
        updated_at=updated_at,
        tokenizer_object="tok",
    )


GPU0 = DeviceInfo(
    kind="cuda",
    name="NVIDIA GeForce RTX 4090",
    index=0,
    total_memory_gb=24.0,
    free_memory_gb=20.0,
    compute_capability="8.9",
    cuda_version="12.4",
)


def test_cpu_only_workers_list_no_gpus() -> None:
    cpu = DeviceInfo(kind="cpu", name="AMD EPYC")
    workers = [worker("w1", cpu), worker("w2", cpu)]
    assert gpu_info(workers) == {
        "gpus": [],
        "cpu": [{"name": "AMD EPYC", "host": "h1", "models": ["m"], "workers": ["w1", "w2"]}],
    }
    assert gpu_count(workers) == 0
    assert gpu_info([]) == {"gpus": [], "cpu": []}


def test_workers_sharing_a_gpu_list_it_once_with_the_freshest_reading() -> None:
    stale = worker("w1", GPU0, model="a")
    fresh = worker("w2", GPU0.model_copy(update={"free_memory_gb": 12.5}), model="b", updated_at=2.0)
    other_host = worker("w3", GPU0, host="h2")
    info = gpu_info([stale, fresh, other_host])
    assert gpu_count([stale, fresh, other_host]) == 2
    first = info["gpus"][0]
    assert first["id"] == 0 and first["name"] == GPU0.name and first["free_memory_gb"] == 12.5
    assert first["compute_capability"] == "8.9" and first["cuda_version"] == "12.4" and first["is_nvidia_4090"]
    assert first["models"] == ["a", "b"] and first["workers"] == ["w1", "w2"] and info["cpu"] == []
