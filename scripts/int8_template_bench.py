"""The int8 weight-only GEMM of SmolLM2's `lm_head` (49,152 x 576, bf16 activations) at 1-4 rows: torch's aten
kernel (`_weight_int8pack_mm`) against inductor's C++ template (engine_worker/int8_template_gemm.py), median call
times in one process, alternating.

    PYTHONPATH=$PWD python scripts/int8_template_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from engine_worker.int8_template_gemm import compile_int8_gemm
from engine_worker.weight_quant import Int8WeightOnly


def median_us(kernel, x: torch.Tensor, calls: int = 200) -> float:
    for _ in range(20):
        kernel(x)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        kernel(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weight = (torch.randn(49152, 576, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    aten = Int8WeightOnly(weight, None)
    template = compile_int8_gemm(aten)
    with torch.inference_mode():
        for rows in (1, 2, 4):
            x = torch.randn(rows, 576).bfloat16()
            for _ in range(args.repeats):
                a, t = median_us(aten, x), median_us(template, x)
                sys.stdout.write(f"rows {rows}: aten {a:7.0f} us  template {t:7.0f} us  ({a / t:.2f}x)\n")


if __name__ == "__main__":
    main()
