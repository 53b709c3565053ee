"""The int8 weight-only GEMM of a few rows on a CPU through inductor's C++ GEMM template (issue #19).

`torch._weight_int8pack_mm` on a CPU runs SmolLM2's int8 `lm_head` (49,152 x 576) at one row in 2.0-2.5 ms, about
20% of a compiled decode step. Inductor's C++ GEMM template (an AVX-512 micro-kernel over int8 weights it blocks
itself) computes the same product in 0.7-0.9 ms (scripts/int8_template_bench.py; docs/quantization.md). The
template is only generated for weights that are compile-time constants, which means inductor's freezing: the
weights go in as buffers of a module of their own, and the module is compiled with `freezing` and GEMM autotuning
between the template and the aten kernel (so it is never slower than the kernel it replaces).

Two things the compile must not do:
- **Take or leave anything in inductor's on-disk caches.** Frozen weights are baked into the compiled code. In a
  trial under `torch.no_grad()` (torch 2.13), a cache hit for the same shapes handed a second process the code of
  the first one's weights (its products, not its own). Under inference mode, as here, that did not reproduce,
  but nothing in the cache key holds the weights' values, so this compile, and only this one, runs with the FX
  graph, AOTAutograd and autotune caches off: 3-4 s on every start, on the background warm-up thread.
- **Change a row's result with the rows beside it.** One graph takes every call (a lone row padded to two); a
  row's products are bit-identical alone and in a call of 2-4 rows, as the aten kernel's are
  (tests/engine_worker/test_int8_template_gemm.py).

The compiled module is called eagerly, from the eager step or from the compiled step through its opaque linear
op (compiled_decode.py), never traced into another graph: dynamo would inline its forward and lose the freezing.
"""

from __future__ import annotations

import time

import structlog
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

from engine_worker.weight_quant import Int8WeightOnly, Kernel, int8_weight_only_linear

log = structlog.get_logger(__name__)

MIN_ROWS = 2  # the graph's smallest call: dynamo would give a row count of 1 a graph (and weight copy) of its own


class _Int8Gemm(torch.nn.Module):
    """`x @ (q * scale[:, None]).T (+ bias)`, the weights as buffers so that freezing makes them constants."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_only_linear(x, self.q, self.scale, self.bias)


def compile_int8_gemm(weights: Int8WeightOnly) -> Kernel:
    """The compiled GEMM over `weights`, for calls of any number of rows in the model's dtype, at the current torch
    thread count (the C++ kernel's thread count is fixed when it is generated). Raises what the compile raises;
    the caller keeps the aten kernel then."""
    started = time.perf_counter()
    compiled = torch.compile(_Int8Gemm(weights.q, weights.scale, weights.bias).eval(), fullgraph=True)
    rows_in, dtype = weights.q.shape[1], weights.scale.dtype
    with (
        torch.inference_mode(),
        inductor_config.patch(
            freezing=True,
            max_autotune_gemm=True,
            max_autotune_gemm_backends="CPP,ATEN",
            fx_graph_cache=False,
            autotune_local_cache=False,
        ),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        # One graph for every call: its row count symbolic from the first call on (dynamo specialises a size of 1,
        # so a lone row runs as two below). Each graph holds its own re-blocked copy of the weights (~70 MiB of
        # the worker for SmolLM2's lm_head), so not one per row count.
        rows = torch.zeros(MIN_ROWS, rows_in, dtype=dtype, device=weights.q.device)
        torch._dynamo.mark_dynamic(rows, 0)
        compiled(rows)
    log.info(
        "int8 template gemm: compiled",
        shape=list(weights.q.shape),
        threads=torch.get_num_threads(),
        seconds=round(time.perf_counter() - started, 1),
    )

    def kernel(x: torch.Tensor) -> torch.Tensor:
        # A call the warm-up did not cover (grad mode on) runs the aten kernel rather than compiling again on the
        # engine thread, where the config above (no caches) would not hold.
        with torch.compiler.set_stance("eager_on_recompile"):
            if x.shape[0] < MIN_ROWS:
                return compiled(x.expand(MIN_ROWS, -1).contiguous())[: x.shape[0]]
            return compiled(x)

    return kernel
