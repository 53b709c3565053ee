"""The fast path's linear layers and the weights they own: a dense weight pre-packed for oneDNN on a CPU, or
lower-precision weights (weight_quant.py) that replace it (fp16) or stand beside it for small steps (int8/int4);
and the embedding table, kept in the precision of the linear weights."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine_worker.weight_quant import QuantizedLinear, quantize_linear


@dataclass(frozen=True, slots=True)
class WeightQuantPlan:
    """Which quantized twin every linear gets (weight_quant.py) and up to how many rows a step uses it."""

    mode: str = "none"
    max_rows: int = 0

    def for_lm_head(self) -> WeightQuantPlan:
        """int4 keeps the output layer in int8: GGUF files keep it (and the tied embedding) at 8 bits or more
        (SmolLM2's Q4_1 file: a Q8_0 embedding), and int4 there cost +3.2% perplexity against +0.4% for int8."""
        return replace(self, mode="int8") if self.mode == "int4" else self


class Linear:
    """`y = x @ W.T + b`. On CPU the weight is pre-packed once for oneDNN, which runs these GEMMs 1.2-2x
    faster than `F.linear` (bf16 and fp32, measured on this repo's CPU); elsewhere it is plain `F.linear`.
    With quantized weights (`quant`) that replace the dense ones (fp16), every call runs them and no dense weight is
    kept; with a quantized twin (int8/int4), calls of at most `quant.max_rows` rows (memory-bound decode steps)
    use it and larger ones the dense weight."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: WeightQuantPlan = WeightQuantPlan()
    ) -> None:
        self.out_features = weight.shape[0]
        self.quant: QuantizedLinear | None = quantize_linear(weight, bias, quant.mode, quant.max_rows)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.packed = False
        if self.quant is not None and self.quant.replaces_dense:
            return  # the quantized weights hold the bias too
        self.weight, self.bias = owned(weight), None if bias is None else owned(bias)
        if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and can_pack():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight)
                probe = torch.ones(2, weight.shape[1], dtype=weight.dtype)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
                if torch.allclose(got.float(), F.linear(probe, weight, bias).float(), rtol=1e-2, atol=1e-2):
                    self.weight, self.packed = packed, True
            except (RuntimeError, AttributeError):  # an older or mkldnn-less torch: stay on F.linear
                pass

    @property
    def keeps_dense(self) -> bool:
        return self.weight is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and self.quant.applies_to(x.shape[0]):
            return self.quant(x)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def owned(weight: torch.Tensor) -> torch.Tensor:
    """A CPU weight in the process's own memory. The loader maps the checkpoint file and its tensors are views of
    one mapping, so keeping any of them (the embedding, a norm) would keep every page of the file resident next
    to the packed copies the runner uses (513 MB of SmolLM2 in fp32). Elsewhere `.to(device)` already copied."""
    return weight.clone() if weight.device.type == "cpu" else weight


def fused_linear(*projections: torch.nn.Linear, quant: WeightQuantPlan) -> Linear:
    """One GEMM for projections that read the same input (q/k/v, gate/up); biases as the model has them."""
    biases = [p.bias for p in projections]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ValueError("models with biases on only some of q/k/v or gate/up are not supported")
    return Linear(torch.cat([p.weight for p in projections]), bias, quant)


def lookup_table(weight: torch.Tensor, half: bool) -> torch.Tensor:
    """The embedding table. Beside fp16 linear weights it is kept in fp16 too (rows upcast as they are gathered):
    a tied embedding is then held as this table and fbgemm's packed `lm_head`, 2 x 54 MiB for SmolLM2, instead of
    2 x 108 MiB in fp32 (fbgemm's packed layout cannot be gathered from, so the two cannot share storage)."""
    return weight.to(torch.float16) if half else owned(weight)


def can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
