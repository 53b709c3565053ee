"""What hardware a worker runs on, for the registry and `/v1/gpu/info`. Read from torch, never made up."""

from __future__ import annotations

import platform
from pathlib import Path

from contracts import DeviceInfo


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: str) -> DeviceInfo:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo(
            kind="cuda",
            name=props.name,
            index=index,
            total_memory_gb=round(total / 2**30, 2),
            free_memory_gb=round(free / 2**30, 2),
            compute_capability=f"{props.major}.{props.minor}",
            cuda_version=torch.version.cuda,
        )
    return DeviceInfo(kind=dev.type, name=_cpu_name())
