"""Lower-precision linear weights for the memory-bound steps (docs/quantization.md).

A decode step of a few sequences reads every weight once and does little arithmetic with it, so its time is the
weight bytes over the memory bandwidth; fp16 or int8 weights read half of bf16 or fp32 (int8: a quarter of fp32).

Modes and kernels (all maintained torch ops; measurements in docs/quantization.md):
- fp16: fbgemm's GEMM over fp16 weights with fp32 activations and arithmetic (`quantized::linear_dynamic_fp16`), for
  fp32 models on a CPU (a CPU without native bf16 runs fp32). The fp16 weights are the **only** weights: every
  call, of any number of rows, runs them, and no dense copy is kept (half the weight memory). A row's result must
  not depend on the batch it shares a step with (a resumed request recomputes its tokens in one big prefill):
  fbgemm splits a call's rows over micro-kernels of 1-6 rows (AVX2), and its 1- and 2-row kernels accumulate in
  another order than the 3-6-row ones (measured: up to 1e-5 apart). So every call is padded to a multiple of
  `FP16_ROW_TILE` rows, which fbgemm runs with its 6-row kernel only; a row then gets the same bits alone and in
  any batch. That is probed once per process (`fp16_rows_invariant`); where it fails (another CPU family, another
  fbgemm) fp16 is not applied and the dense weights run. No-op elsewhere (already 16-bit weights, GPUs).
- int8: `torch._weight_int8pack_mm` (int8 weights, per-output-channel scales, activations in the model dtype):
  CUDA, MPS, and CPUs with AVX-512 running bf16. On an AVX2 CPU, and with fp32 activations on AVX-512 too, its
  kernel is a scalar loop 3-15x slower than the dense GEMM (measured), so it warns. fbgemm's dynamic int8
  (activations quantized per tensor with 7 bits) was measured and rejected: +17% perplexity and greedy output
  diverging within a few tokens.
- int4: `torch._weight_int4pack_mm_for_cpu` (groups of 32, scale and zero per group) on AVX-512 CPUs; elsewhere
  int8 with a warning (the CUDA tinygemm layout is not wired up yet). `lm_head` gets int8 (linear.py).
  `auto` picks it for a bf16 model on an AVX-512 CPU: decode steps of 1-4 rows 1.4-1.9x faster on SmolLM2.
int8 and int4 are copies beside the dense weights, used for calls of at most `max_rows` rows: torch's int kernels
cost time per row (no dequantized tile reused across rows), so from ~8 rows on the dense GEMM wins. Each row's
result is the same alone and in any call that runs the copy, but not across `max_rows`: a request resumed through
one big (dense) prefill can continue differently (docs/reliability.md).
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
# fbgemm's largest AVX2 fp16 micro-kernel: calls padded to a multiple of it run that kernel only.
FP16_ROW_TILE = 6


def resolve_weight_quant(
    requested: str, weight_bytes: int, dtype: torch.dtype, device: torch.device, cpu_capability: str
) -> str:
    """The mode to apply (`cpu_capability`: `torch.backends.cpu.get_cpu_capability()`, read at load). `auto`, for a
    model big enough to be memory-bound (else none):
    - int4 twins (int8 for `lm_head`) when it runs bf16 on a CPU whose int kernels are vectorized (AVX-512):
      decode steps of 1-4 rows measured 1.4-1.9x faster, perplexity +0.4%;
    - else fp16, which applies to fp32 weights on a CPU (the only other case measured lossless and faster; on an
      AVX2 CPU the int kernels are scalar loops, and with fp32 activations they are scalar on AVX-512 too); 16-bit
      models on other CPUs and GPUs keep their weights."""
    if requested == "auto":
        if weight_bytes < AUTO_MIN_WEIGHT_BYTES:
            return "none"
        vectorized = int_kernels_vectorized(cpu_capability)
        return "int4" if device.type == "cpu" and dtype == torch.bfloat16 and vectorized else "fp16"
    if requested not in ("none", "fp16", "int8", "int4"):
        raise ValueError(f"weight_quant must be auto, none, fp16, int8 or int4, got {requested!r}")
    return requested


def int_kernels_vectorized(cpu_capability: str) -> bool:
    """Whether torch's int8/int4 weight-only CPU kernels have a vector path on a CPU of this capability
    (`torch.backends.cpu.get_cpu_capability()`): AVX-512 (AMX CPUs report AVX512); on AVX2 they are scalar loops."""
    return cpu_capability.startswith(("AVX512", "AMX"))


def _cpu_has_avx512() -> bool:
    return int_kernels_vectorized(torch.backends.cpu.get_cpu_capability())


class QuantizedLinear:
    """`y = x @ W.T + b` through quantized weights. `max_rows` is the largest call they are used for next to the
    dense weights; None: they are the only weights, used for every call. `traceable`: whether a compiled step may
    trace `kernel` into its graph (aten ops) or must call it opaquely (a kernel compiled on its own,
    `use_compiled_kernel`)."""

    def __init__(self, kernel: Kernel, name: str, max_rows: int | None) -> None:
        self.kernel, self.name, self.max_rows = kernel, name, max_rows
        self.traceable = True

    def use_compiled_kernel(self, kernel: Kernel, name: str) -> None:
        """Run `kernel` from now on (the engine thread picks it up at its next call: one attribute swap)."""
        self.traceable = False
        self.kernel, self.name = kernel, name

    @property
    def replaces_dense(self) -> bool:
        return self.max_rows is None

    def applies_to(self, rows: int) -> bool:
        return self.max_rows is None or rows <= self.max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, max_rows: int
) -> QuantizedLinear | None:
    """Quantized weights for a dense linear (fp16: to replace it; int8/int4: a twin for calls of at most `max_rows`
    rows), or None when `mode` is none or no kernel fits (the dense weights run)."""
    if mode == "none":
        return None
    if mode == "fp16":
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None  # already 16-bit (or a GPU): nothing to gain
        kernel = _fp16_fbgemm(weight, bias)
        return None if kernel is None else QuantizedLinear(kernel, "fbgemm-fp16", None)
    if mode == "int4" and weight.shape[1] % INT4_GROUP == 0 and weight.device.type == "cpu" and _cpu_has_avx512():
        if weight.dtype == torch.float32:
            _warn_slow_kernel("int4 with fp32 activations", weight.device)  # a scalar loop here too: 0.1x
        return QuantizedLinear(_int4_cpu(weight, bias), "int4pack", max_rows)
    if mode == "int4":
        _warn_slow_kernel("int4", weight.device)
    if weight.device.type == "cpu" and (not _cpu_has_avx512() or weight.dtype == torch.float32):
        _warn_slow_kernel("int8", weight.device)
    return QuantizedLinear(Int8WeightOnly(weight, bias), "int8pack", max_rows)


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


class Int8WeightOnly:
    """`torch._weight_int8pack_mm` over per-channel int8 weights; the weights stay readable, for a kernel compiled
    over the same weights (int8_template_gemm.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.q, scale = _int8_per_channel(weight)
        self.scale, self.bias = scale.to(weight.dtype), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_only_linear(x, self.q, self.scale, self.bias)


def int8_weight_only_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T (+ bias)` through torch's int8 weight-only kernel."""
    y = torch.ops.aten._weight_int8pack_mm(x, q, scale)
    return y if bias is None else y + bias


def _fp16_fbgemm(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel | None:
    """fbgemm's GEMM over fp16 weights with fp32 activations: half the bytes of fp32 weights, fp32 arithmetic."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None if bias is None else bias.float())
    except (RuntimeError, AttributeError) as exc:
        log.warning("weight_quant.fbgemm_unavailable", error=str(exc))
        return None
    if not fp16_rows_invariant():
        log.warning("weight_quant.fp16_batch_dependent", hint="fbgemm's rows differ by batch here: dense weights")
        return None
    return functools.partial(_fp16_tiled, packed)


def _fp16_tiled(packed: object, x: torch.Tensor) -> torch.Tensor:
    """`linear_dynamic_fp16` on rows padded to a multiple of `FP16_ROW_TILE` (zeros; each row's result depends on
    its own inputs only), so fbgemm runs its 6-row kernel on every row."""
    rows = x.shape[0]
    pad = -rows % FP16_ROW_TILE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    y = torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return y[:rows] if pad else y


@functools.cache  # once per process: a property of the CPU and the fbgemm build
def fp16_rows_invariant() -> bool:
    """Whether a row gets the same bits from `_fp16_tiled` in calls of every size: rows of calls of up to 1,032 rows
    (several of fbgemm's 120-row blocks) against the same rows computed one tile at a time."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 576, generator=generator)  # 24 columns: one full column block and a fringe
    packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
    x = torch.randn(1032, 576, generator=generator)
    with torch.inference_mode():
        tiles = torch.cat([_fp16_tiled(packed, x[i : i + FP16_ROW_TILE]) for i in range(0, len(x), FP16_ROW_TILE)])
        alone = [_fp16_tiled(packed, x[i : i + 1]) for i in range(8)]
        sizes = [*range(1, 130), 240, 246, 253, 511, 512, 1032]
        return all(torch.equal(alone[i], tiles[i : i + 1]) for i in range(8)) and all(
            torch.equal(_fp16_tiled(packed, x[:rows]), tiles[:rows]) for rows in sizes
        )


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
