"""Quantized weights (engine_worker/weight_quant.py): each kernel close to the dense GEMM; fp16 weights as the only
weights (no dense copy kept, each row's result the same bits in any batch); the per-call choice by rows of the
int8/int4 twins; the `auto` rule; and greedy decoding of the tiny model unchanged by fp16 weights. The oracle tests
run with quantization off (conftest.py `engine_factory`), so they stay exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine_worker.linear import Linear, WeightQuantPlan
from engine_worker.weight_quant import (
    AUTO_MIN_WEIGHT_BYTES,
    Int8WeightOnly,
    _cpu_has_avx512,
    _int4_cpu,
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


CPU = torch.device("cpu")


def test_auto_quantizes_only_models_big_enough_to_be_memory_bound() -> None:
    assert resolve_weight_quant("auto", AUTO_MIN_WEIGHT_BYTES, torch.float32, CPU, "AVX2") == "fp16"
    assert resolve_weight_quant("auto", AUTO_MIN_WEIGHT_BYTES - 1, torch.float32, CPU, "AVX2") == "none"
    assert resolve_weight_quant("auto", AUTO_MIN_WEIGHT_BYTES - 1, torch.bfloat16, CPU, "AVX512") == "none"
    assert resolve_weight_quant("int8", 0, torch.float32, CPU, "AVX2") == "int8"
    with pytest.raises(ValueError, match="weight_quant"):
        resolve_weight_quant("int3", 0, torch.float32, CPU, "AVX2")


@pytest.mark.parametrize(
    ("dtype", "device", "capability", "expected"),
    [
        (torch.bfloat16, "cpu", "AVX512", "int4"),  # native bf16: torch's int kernels are vectorized, 1.4-1.9x
        (torch.bfloat16, "cpu", "AVX2", "fp16"),  # scalar int kernels (fp16 is then a no-op for bf16 weights)
        (torch.float32, "cpu", "AVX512", "fp16"),  # AVX-512 without bf16: int kernels with fp32 inputs are scalar
        (torch.float32, "cpu", "AVX2", "fp16"),
        (torch.bfloat16, "cuda", "AVX512", "fp16"),  # a GPU keeps its 16-bit weights
    ],
)
def test_auto_picks_int4_only_for_a_bf16_model_on_a_cpu_with_vectorized_int_kernels(
    dtype, device, capability, expected
) -> None:
    assert resolve_weight_quant("auto", AUTO_MIN_WEIGHT_BYTES, dtype, torch.device(device), capability) == expected


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
    got = Int8WeightOnly(weight, bias)(x)
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


@pytest.mark.parametrize("make_kernel", [Int8WeightOnly, _int4_cpu], ids=["int8", "int4"])
def test_int_twins_with_bf16_activations_stay_close_to_the_dense_bf16_gemm(make_kernel) -> None:
    # auto's case: a bf16 model on an AVX-512 CPU. Relative error of a random (not 4-bit) weight: int8 0.6%, int4 6%.
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(192, 576, generator=generator) * 0.05).bfloat16()
    bias = torch.randn(192, generator=generator).bfloat16()
    x = torch.randn(4, 576, generator=generator).bfloat16()
    got = make_kernel(weight, bias)(x)
    assert got.dtype == torch.bfloat16
    bound = 0.02 if make_kernel is Int8WeightOnly else 0.1
    assert _relative_error(got, x.float() @ weight.float().T + bias.float()) < bound


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int_twins_give_a_row_the_same_bits_alone_and_with_up_to_max_rows_rows(mode) -> None:
    # Within the steps that run the twin a row's result does not depend on the batch (measured up to 512 rows, 1
    # and 2 threads: torch's int kernels compute each row on its own); across max_rows it does (dense weights).
    generator = torch.Generator().manual_seed(4)
    weight = (torch.randn(576, 1536, generator=generator) * 0.05).bfloat16()
    x = torch.randn(5, 1536, generator=generator).bfloat16()
    linear = Linear(weight, None, WeightQuantPlan(mode, max_rows=4))
    with torch.inference_mode():
        alone = torch.cat([linear(x[i : i + 1]) for i in range(5)])
        for rows in (2, 3, 4):
            for start in (0, 1):
                assert torch.equal(linear(x[start : start + rows]), alone[start : start + rows]), (rows, start)


def test_int4_keeps_the_output_layer_in_int8(engine_factory) -> None:
    # GGUF files keep the output layer / tied embedding at 8 bits or more (SmolLM2's Q4_1 file: Q8_0); int4 there
    # cost +3.2% perplexity on SmolLM2, int8 +0.4%.
    assert WeightQuantPlan("int4", 4).for_lm_head() == WeightQuantPlan("int8", 4)
    assert WeightQuantPlan("int8", 4).for_lm_head() == WeightQuantPlan("int8", 4)
    runner = engine_factory(weight_quant="int4", dtype="bfloat16").runner
    assert runner.lm_head.quant is not None and runner.lm_head.quant.name == "int8pack"
    body = "int4pack" if _cpu_has_avx512() else "int8pack"  # int4 has no vector kernel without AVX-512: int8
    assert all(layer.gate_up.quant is not None and layer.gate_up.quant.name == body for layer in runner.layers)


def test_a_linear_uses_its_int8_twin_only_up_to_max_rows(weight_and_input) -> None:
    weight, bias, _ = weight_and_input
    linear = Linear(weight, bias, WeightQuantPlan("int8", max_rows=2))
    assert linear.quant is not None and linear.keeps_dense
    x = torch.randn(3, 128)
    assert torch.equal(linear(x[:2]), linear.quant(x[:2]))  # few rows: the quantized weights
    dense = linear(x)  # more rows: the dense weights, which int8 does not reproduce bit for bit
    assert not torch.equal(dense, linear.quant(x))
    assert _relative_error(dense, x @ weight.T + bias) < 1e-5


@pytest.mark.parametrize(
    ("out_features", "in_features", "most_rows"),
    [(3072, 576, 512), (576, 1536, 512), (49152, 576, 33)],  # SmolLM2's gate/up, down, and lm_head (sampled rows)
    ids=["gate_up", "down", "lm_head"],
)
def test_fp16_weights_give_a_row_the_same_bits_alone_and_in_any_batch(out_features, in_features, most_rows) -> None:
    # A request resumed after a crash recomputes its tokens in one big prefill where the first worker decoded them
    # one row at a time, next to batches of every size: the same text needs the same bits for a row in any call.
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator) * 0.1
    x = torch.randn(most_rows + 1, in_features, generator=generator)
    with torch.inference_mode():
        linear = Linear(weight, bias, WeightQuantPlan("fp16", max_rows=16))  # max_rows: only for int8/int4 twins
        assert linear.quant is not None and not linear.keeps_dense  # the fp16 GEMM runs every call
        alone = torch.cat([linear(x[i : i + 1]) for i in range(x.shape[0])])
        for rows in sorted({2, 3, 4, 7, 16, 33, 64, 128, most_rows} & set(range(most_rows + 1))):
            for start in (0, 1):  # the same rows at another position inside the call
                assert torch.equal(linear(x[start : start + rows]), alone[start : start + rows]), (rows, start)
    assert _relative_error(alone, x @ weight.T + bias) < 1e-3


# Run in a fresh interpreter: in the suite's process the allocator holds memory freed by earlier tests and hands it
# back for the new weights without the resident size growing (CI once saw +32 KiB for a 64 MiB packed copy).
_HELD_BYTES = """
import json

import psutil
import torch

from engine_worker.linear import Linear, WeightQuantPlan
from engine_worker.weight_quant import fp16_rows_invariant


def resident() -> int:
    return psutil.Process().memory_info().rss


weight = torch.randn(2048, 8192) * 0.05  # 64 MiB in fp32
fp16_rows_invariant()  # the once-per-process probe's scratch (~7 MiB on some CPUs) is not the weights' memory
with torch.inference_mode():
    before = resident()
    dense = Linear(weight)
    with_dense = resident()
    fp16 = Linear(weight, None, WeightQuantPlan("fp16"))
    with_fp16 = resident()
    x = torch.randn(4, 8192)
    want = dense(x)
    error = ((fp16(x) - want).norm() / want.norm()).item()
print(json.dumps({
    "size": weight.numel() * weight.element_size(), "dense": with_dense - before, "fp16": with_fp16 - with_dense,
    "keeps_dense": [dense.keeps_dense, fp16.keeps_dense], "fp16_weight_dropped": fp16.weight is None,
    "relative_error": error,
}))
"""


def test_fp16_weights_are_the_only_copy_held() -> None:
    done = subprocess.run([sys.executable, "-c", _HELD_BYTES], capture_output=True, text=True, timeout=120, check=True)
    held = json.loads(done.stdout.strip().splitlines()[-1])
    assert held["keeps_dense"] == [True, False] and held["fp16_weight_dropped"]
    assert held["dense"] > 0.9 * held["size"]  # the measure sees a dense copy (the packed fp32 weight)
    assert held["fp16"] < 0.6 * held["size"]  # fp16 alone: half of it, no fp32 copy beside it
    assert held["relative_error"] < 1e-3


def test_auto_leaves_the_tiny_oracle_model_dense(engine_factory) -> None:
    # Integration tests serve the tiny model with default settings and compare with transformers exactly.
    runner = engine_factory(weight_quant="auto").runner
    assert runner.lm_head.quant is None and all(layer.qkv.quant is None for layer in runner.layers)


def test_fp16_runner_holds_no_dense_weights_and_the_embedding_once_in_fp16(engine_factory) -> None:
    fp16, dense = engine_factory(weight_quant="fp16").runner, engine_factory(weight_quant="none").runner
    names = ("qkv", "o", "gate_up", "down")
    linears = [fp16.lm_head, *(getattr(layer, name) for layer in fp16.layers for name in names)]
    assert all(linear.quant is not None and not linear.keeps_dense for linear in linears)
    assert fp16.embed.dtype == torch.float16 and dense.embed.dtype == torch.float32
    ids = torch.tensor([5, 1000, 5])
    assert fp16.embed_tokens(ids).dtype == torch.float32
    assert torch.equal(fp16.embed_tokens(ids), dense.embed_tokens(ids).half().float())


def test_a_sequence_gets_the_same_logprobs_alone_and_in_a_batch_with_fp16_weights(engine_factory) -> None:
    # 40 sequences make steps of 40 rows: beyond the 16 rows that used to switch from an fp16 copy to dense weights.
    def logprobs(batch: int) -> list[float]:
        engine = engine_factory(weight_quant="fp16", max_num_seqs=batch, num_speculative_tokens=0)
        for i in range(batch):
            engine.add_request(make_request(f"r{i}", prompt_of(12, i), temperature=0.0, max_tokens=10, logprobs=0))
        outputs = run_to_completion(engine)["r0"]
        return [lp.logprob for out in outputs for choice in out.choices for lp in choice.logprobs or []]

    alone = logprobs(1)
    assert len(alone) == 10 and logprobs(40) == alone


def test_greedy_decoding_of_the_tiny_model_is_unchanged_by_fp16_weights(engine_factory) -> None:
    def greedy(**config) -> dict[str, list[int]]:
        engine = engine_factory(**config)
        for i in range(3):
            engine.add_request(make_request(f"r{i}", prompt_of(8 + i, i), temperature=0.0, max_tokens=24))
        return {rid: tokens_by_choice(outs)[0] for rid, outs in run_to_completion(engine).items()}

    quantized = engine_factory(weight_quant="fp16")
    assert quantized.runner.lm_head.quant is not None
    assert greedy(weight_quant="fp16") == greedy(weight_quant="none")
