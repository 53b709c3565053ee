"""The int8 weight-only GEMM through inductor's C++ template (engine_worker/int8_template_gemm.py)."""

from __future__ import annotations

import pytest
import torch

from engine_worker.int8_template_gemm import compile_int8_gemm
from engine_worker.weight_quant import Int8WeightOnly


def _int8_weights(seed: int, out_features: int = 1024, in_features: int = 576) -> Int8WeightOnly:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return Int8WeightOnly(weight.bfloat16(), None)


@pytest.fixture(scope="module")
def weights_and_kernel() -> tuple[Int8WeightOnly, object]:
    weights = _int8_weights(0)
    return weights, compile_int8_gemm(weights)


def test_the_template_computes_what_the_aten_kernel_does_and_a_row_the_same_alone_and_in_a_call(
    weights_and_kernel,
) -> None:
    weights, kernel = weights_and_kernel
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        together = kernel(x)
        want = weights(x)
        alone = [kernel(x[i : i + 1]) for i in range(4)]
        prefixes = [kernel(x[:rows]) for rows in (2, 3)]
    error = ((together.float() - want.float()).norm() / want.float().norm()).item()
    assert error < 1e-2, error  # bf16 outputs of the same int8 products, summed in another order
    assert all(torch.equal(alone[i], together[i : i + 1]) for i in range(4))
    assert all(torch.equal(prefix, together[: len(prefix)]) for prefix in prefixes)


def test_a_call_it_was_not_warmed_for_runs_the_aten_kernel_without_compiling_again(weights_and_kernel) -> None:
    from torch._dynamo.utils import counters

    weights, kernel = weights_and_kernel
    x = torch.randn(2, 576).bfloat16()
    graphs = counters["stats"]["unique_graphs"]
    got = kernel(x)  # grad mode on: the warmed graphs' guards fail (they were built under inference mode)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(got, weights(x))
