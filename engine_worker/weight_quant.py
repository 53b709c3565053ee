"""Quantized copies of linear weights for the memory-bound steps (docs/quantization.md).

A decode step of a few sequences reads every weight once and does little arithmetic with it, so its time is the
weight bytes over the memory bandwidth; an int8 copy reads half of bf16 and a quarter of fp32. A step with many
rows (a large batch, a prefill chunk) is compute-bound and runs the dense weight, so the model runner keeps both
and picks per call by the number of rows (`QuantizedLinear.max_rows`).

Modes and kernels (all maintained torch ops; measurements in docs/quantization.md):
- fp16: fbgemm's GEMM over fp16 weights with fp32 activations (`quantized::linear_dynamic_fp16`), for fp32 models
  on a CPU (a CPU without native bf16 runs fp32): half the bytes, no measurable quality loss. No-op elsewhere.
- int8: `torch._weight_int8pack_mm` (int8 weights, per-output-channel scales, activations in the model dtype):
  CUDA, MPS, and CPUs with AVX-512. On an AVX2 CPU its kernel is a scalar loop 3-15x slower than the dense GEMM
  (measured), so it warns. fbgemm's dynamic int8 (activations quantized per tensor with 7 bits) was measured and
  rejected: +17% perplexity and greedy output diverging within a few tokens.
- int4: `torch._weight_int4pack_mm_for_cpu` (groups of 32, scale and zero per group) on AVX-512 CPUs; elsewhere
  int8 with a warning (the CUDA tinygemm layout is not wired up yet).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import structlog
import torch

log = structlog.get_logger(__name__)

WeightQuant = Literal["auto", "none", "fp16", "int8", "int4"]
INT4_GROUP = 32
# `auto` quantizes a model whose linear weights take at least this much memory in the step dtype: below it they
# stay in the CPU's caches and a step is bound by dispatch, not by weight reads (the tiny test models).
AUTO_MIN_WEIGHT_BYTES = 64 * 2**20

Kernel = Callable[[torch.Tensor], torch.Tensor]


def resolve_weight_quant(requested: str, weight_bytes: int) -> str:
    """The mode to apply. `auto` is fp16 for a model big enough to be memory-bound (it applies to fp32 weights on
    a CPU, the only case measured lossless and faster), else none."""
    if requested == "auto":
        return "fp16" if weight_bytes >= AUTO_MIN_WEIGHT_BYTES else "none"
    if requested not in ("none", "fp16", "int8", "int4"):
        raise ValueError(f"weight_quant must be auto, none, fp16, int8 or int4, got {requested!r}")
    return requested


def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


class QuantizedLinear:
    """`y = x @ W.T + b` through a quantized copy of W; `max_rows` is how many rows it is used for."""

    def __init__(self, kernel: Kernel, name: str, max_rows: int) -> None:
        self.kernel, self.name, self.max_rows = kernel, name, max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, max_rows: int
) -> QuantizedLinear | None:
    """A quantized twin of a dense linear, or None when `mode` is none or no kernel fits (the dense one runs)."""
    if mode == "none":
        return None
    if mode == "fp16":
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None  # already 16-bit (or a GPU): nothing to gain
        kernel = _fp16_fbgemm(weight, bias)
        return None if kernel is None else QuantizedLinear(kernel, "fbgemm-fp16", max_rows)
    if mode == "int4" and weight.shape[1] % INT4_GROUP == 0 and weight.device.type == "cpu" and _cpu_has_avx512():
        return QuantizedLinear(_int4_cpu(weight, bias), "int4pack", max_rows)
    if mode == "int4":
        _warn_slow_kernel("int4", weight.device)
    if weight.device.type == "cpu" and not _cpu_has_avx512():
        _warn_slow_kernel("int8", weight.device)
    return QuantizedLinear(_int8_weight_only(weight, bias), "int8pack", max_rows)


@functools.cache  # once per process, not once per layer
def _warn_slow_kernel(mode: str, device: torch.device) -> None:
    if mode == "int4":
        log.warning("weight_quant.int4_unavailable", device=str(device), using="int8")
    else:
        log.warning("weight_quant.slow_kernel", mode=mode, device=str(device), hint="use fp16 on this CPU")


def _int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: W ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int8_weight_only(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    q, scale = _int8_per_channel(weight)
    scale = scale.to(weight.dtype)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, q, scale)
        return y if bias is None else y + bias

    return kernel


def _fp16_fbgemm(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel | None:
    """fbgemm's GEMM over fp16 weights with fp32 activations: half the bytes of fp32 weights, fp32 arithmetic."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None if bias is None else bias.float())
    except (RuntimeError, AttributeError) as exc:
        log.warning("weight_quant.fbgemm_unavailable", error=str(exc))
        return None

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)

    return kernel


def _int4_cpu(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    """Asymmetric int4 in groups of 32 along the input dimension (the layout of GGUF Q4_1: a Q4_1 checkpoint
    round-trips up to the rounding of its scales)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # The kernel computes (q - 8) * scale + zero.
    scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_and_zeros)
        return y if bias is None else y + bias

    return kernel
