"""Quantized weight copies (engine_worker/weight_quant.py): each kernel close to the dense GEMM, the per-call choice
by rows, the `auto` rule, and greedy decoding of the tiny model unchanged by fp16 weights. The oracle tests run with
quantization off (conftest.py `engine_factory`), so they stay exact."""

from __future__ import annotations

import pytest
import torch

from engine_worker.model_runner import WeightQuantPlan, _Linear
from engine_worker.weight_quant import (
    AUTO_MIN_WEIGHT_BYTES,
    _int4_cpu,
    _int8_weight_only,
    quantize_linear,
    resolve_weight_quant,
)
from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion, tokens_by_choice


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture
def weight_and_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator) * 0.05
    bias = torch.randn(96, generator=generator)
    x = torch.randn(3, 128, generator=generator)
    return weight, bias, x


def test_auto_quantizes_only_models_big_enough_to_be_memory_bound() -> None:
    assert resolve_weight_quant("auto", AUTO_MIN_WEIGHT_BYTES) == "fp16"
    assert resolve_weight_quant("auto", AUTO_MIN_WEIGHT_BYTES - 1) == "none"
    assert resolve_weight_quant("int8", 0) == "int8"
    with pytest.raises(ValueError, match="weight_quant"):
        resolve_weight_quant("int3", 0)


def test_fp16_weights_match_the_fp32_gemm_closely(weight_and_input) -> None:
    weight, bias, x = weight_and_input
    quant = quantize_linear(weight, bias, "fp16", max_rows=8)
    assert quant is not None and quant.name == "fbgemm-fp16"
    assert _relative_error(quant(x), x @ weight.T + bias) < 1e-3


def test_fp16_is_not_applied_to_weights_already_16_bit(weight_and_input) -> None:
    weight, bias, _ = weight_and_input
    assert quantize_linear(weight.bfloat16(), bias.bfloat16(), "fp16", max_rows=8) is None
    assert quantize_linear(weight, bias, "none", max_rows=8) is None


def test_int8_weight_only_is_within_per_channel_rounding(weight_and_input) -> None:
    weight, bias, x = weight_and_input
    got = _int8_weight_only(weight, bias)(x)
    assert _relative_error(got, x @ weight.T + bias) < 0.02


def test_int4_reproduces_a_weight_on_a_4_bit_grid_of_groups_of_32() -> None:
    # A GGUF Q4_1 weight is scale * q + min per group of 32, q in 0..15: int4 holds it without loss.
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 4, 32), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid, so its min and scale are recovered
    scale = torch.rand(64, 4, 1, generator=generator) * 0.01 + 0.001
    low = -torch.rand(64, 4, 1, generator=generator) * 0.05
    weight = (q * scale + low).reshape(64, 128)
    x = torch.randn(2, 128, generator=generator)
    assert _relative_error(_int4_cpu(weight, None)(x), x @ weight.T) < 1e-5


def test_a_linear_uses_its_quantized_twin_only_up_to_max_rows(weight_and_input) -> None:
    weight, bias, _ = weight_and_input
    linear = _Linear(weight, bias, WeightQuantPlan("fp16", max_rows=2))
    assert linear.quant is not None
    x = torch.randn(3, 128)
    assert torch.equal(linear(x[:2]), linear.quant(x[:2]))  # few rows: the quantized weights
    dense = linear(x)  # more rows: the dense weights, which fp16 does not reproduce bit for bit
    assert not torch.equal(dense, linear.quant(x))
    assert _relative_error(dense, x @ weight.T + bias) < 1e-5


def test_auto_leaves_the_tiny_oracle_model_dense(engine_factory) -> None:
    # Integration tests serve the tiny model with default settings and compare with transformers exactly.
    runner = engine_factory(weight_quant="auto").runner
    assert runner.lm_head.quant is None and all(layer.qkv.quant is None for layer in runner.layers)


def test_greedy_decoding_of_the_tiny_model_is_unchanged_by_fp16_weights(engine_factory) -> None:
    def greedy(**config) -> dict[str, list[int]]:
        engine = engine_factory(**config)
        for i in range(3):
            engine.add_request(make_request(f"r{i}", prompt_of(8 + i, i), temperature=0.0, max_tokens=24))
        return {rid: tokens_by_choice(outs)[0] for rid, outs in run_to_completion(engine).items()}

    quantized = engine_factory(weight_quant="fp16", weight_quant_max_rows=64)
    assert quantized.runner.lm_head.quant is not None
    assert greedy(weight_quant="fp16", weight_quant_max_rows=64) == greedy(weight_quant="none")
