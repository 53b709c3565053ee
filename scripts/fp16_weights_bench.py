"""Measure fp16 weights as the only weights of an fp32 model on a CPU (docs/quantization.md, `weight_quant`).

`kernel`: for SmolLM2-135M's linear shapes (fused q/k/v, o, fused gate/up, down, lm_head), random weights,
1) whether fbgemm's fp16 GEMM (`quantized::linear_dynamic_fp16`) and the dense fp32 paths are batch-invariant
bit for bit: each row computed alone against the same row inside calls of M rows; 2) time per call of the fp16
GEMM against oneDNN's pre-packed fp32 GEMM (the runner's dense path) and `F.linear`, interleaved, median.

`engine`: two engines of the packaged SmolLM2 in one process, `weight_quant=none` and `fp16`, a 512-token prefill
chunk and decode steps at the given batch sizes, interleaved, median step time; and the resident memory a runner
adds when it loads (VmRSS before and after, each engine measured in a fresh subprocess).

`quality`: perplexity of a held English text (prompt logprobs over docs/architecture.md) and greedy chat answers
(the bench's realistic questions), `none` against `fp16`.

    PYTHONPATH=$PWD python scripts/fp16_weights_bench.py kernel
    PYTHONPATH=$PWD python scripts/fp16_weights_bench.py engine --batch 1,32
    PYTHONPATH=$PWD python scripts/fp16_weights_bench.py quality
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine_worker.weight_quant import _fp16_tiled

SHAPES = {  # (out, in) of SmolLM2-135M's GEMMs as the runner fuses them
    "qkv 960x576": (960, 576),
    "o 576x576": (576, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}
INVARIANCE_ROWS = (2, 3, 4, 7, 16, 33, 64, 128, 512)


def kernels(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    packed16 = torch.ops.quantized.linear_prepack_fp16(weight, None)
    packed32 = torch.ops.mkldnn._reorder_linear_weight(weight)
    return {
        "fp16 tiled": functools.partial(_fp16_tiled, packed16),  # what the runner calls: rows padded to 6
        "fp16 fbgemm": lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed16),
        "fp32 onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed32, None, "none", [], ""),
        "fp32 F.linear": lambda x: F.linear(x, weight),
    }


def check_invariance(name: str, weight: torch.Tensor, out: list[str]) -> None:
    x = torch.randn(max(INVARIANCE_ROWS), weight.shape[1], generator=torch.Generator().manual_seed(1))
    for kernel_name, kernel in kernels(weight).items():
        alone = torch.cat([kernel(x[i : i + 1]) for i in range(x.shape[0])])
        failures = []
        for rows in INVARIANCE_ROWS:
            for start in (0, 1):  # the same rows at other positions inside the call, too
                batched = kernel(x[start : start + rows])
                if not torch.equal(batched, alone[start : start + rows]):
                    worst = (batched - alone[start : start + rows]).abs().max().item()
                    failures.append(f"M={rows}@{start} (max diff {worst:.2e})")
        verdict = "bitwise invariant" if not failures else "DIFFERS at " + ", ".join(failures[:4])
        out.append(f"{name:<18} {kernel_name:<14} {verdict}")


def time_calls(weight: torch.Tensor, rows: list[int], repetitions: int) -> dict[tuple[str, int], float]:
    """Median ms per call; within a repetition the kernels alternate, so a busier moment skews them alike."""
    found: dict[tuple[str, int], list[float]] = {}
    named = kernels(weight)
    for m in rows:
        x = torch.randn(m, weight.shape[1])
        calls = max(1, int(2e8 // (m * weight.numel() * 2 + weight.numel())))  # ~tens of ms per sample
        for fn in named.values():
            fn(x)  # warm
        for _ in range(repetitions):
            for kernel_name, fn in named.items():
                started = time.perf_counter()
                for _ in range(calls):
                    fn(x)
                found.setdefault((kernel_name, m), []).append((time.perf_counter() - started) / calls * 1000)
    return {key: statistics.median(values) for key, values in found.items()}


def kernel_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.torch_threads)
    rows = [int(part) for part in args.rows.split(",")]
    lines: list[str] = []
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
            check_invariance(name, weight, lines)
        sys.stdout.write(
            "\n".join(lines) + "\n\nms per call (median); x = fp32 onednn / fp16 tiled (>1: fp16 faster)\n"
        )
        for name, (n, k) in SHAPES.items():
            weight = torch.randn(n, k) * 0.05
            shape_rows = [m for m in rows if m <= args.lm_head_max_rows or not name.startswith("lm_head")]
            times = time_calls(weight, shape_rows, args.repetitions)
            for m in shape_rows:
                tiled, fp16, onednn, flinear = (
                    times[(kn, m)] for kn in ("fp16 tiled", "fp16 fbgemm", "fp32 onednn", "fp32 F.linear")
                )
                sys.stdout.write(
                    f"{name:<18} M={m:<4} fp16 tiled {tiled:8.3f}  fp16 {fp16:8.3f}  onednn {onednn:8.3f}  "
                    f"F.linear {flinear:8.3f}  x {onednn / tiled:5.2f}\n"
                )
                sys.stdout.flush()


def load_engine(quant: str, max_num_seqs: int, threads: int):
    from common.engine_config import EngineConfig
    from common.settings import Settings
    from engine_worker.engine import Engine
    from engine_worker.loader import resolve_model

    model = resolve_model("SmolLM2-135M-Instruct", Settings().model_cache_dir)
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=1024,
        torch_threads=threads,
        num_speculative_tokens=0,
        prefix_caching=False,
        weight_quant=quant,
        kv_cache_tokens=max_num_seqs * 1024,
    )
    return Engine.from_pretrained(model.local_dir, config)


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_main(args: argparse.Namespace) -> None:
    """In a fresh process: RSS with torch and transformers imported, and after loading one engine."""
    import transformers  # noqa: F401  (imported before the baseline, as a worker has it)

    before = vm_rss_mib()
    engine = load_engine(args.quant, 8, 1)
    after = vm_rss_mib()
    sys.stdout.write(json.dumps({"quant": args.quant, "before": before, "after": after, "ok": engine is not None}))


def engine_main(args: argparse.Namespace) -> None:
    from contracts import GenerateRequest, SamplingParams

    batches = [int(part) for part in args.batch.split(",")]
    quants = ("none", "fp16")
    rss = {}
    for quant in quants * 2:  # each twice, alternating: a fresh process per load
        done = subprocess.run(
            [sys.executable, __file__, "rss", "--quant", quant], capture_output=True, text=True, check=True
        )
        rss.setdefault(quant, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    for quant in quants:
        for sample in rss[quant]:
            sys.stdout.write(
                f"rss {quant:<5} before {sample['before']:.0f} MiB after load {sample['after']:.0f} MiB "
                f"(+{sample['after'] - sample['before']:.0f})\n"
            )
    engines = {quant: load_engine(quant, max(batches), args.torch_threads) for quant in quants}
    for quant, engine in engines.items():
        head = engine.runner.lm_head
        sys.stdout.write(
            f"{quant}: lm_head {head.quant and head.quant.name} dense kept {head.keeps_dense} "
            f"embedding {engine.runner.embed.dtype}\n"
        )
    prompt = list(range(1000, 1000 + 512))

    def request(tag: str, prompt_ids: list[int], max_tokens: int) -> GenerateRequest:
        return GenerateRequest(
            request_id=tag,
            model="bench",
            prompt_token_ids=prompt_ids,
            sampling=SamplingParams(temperature=0.8, seed=1, max_tokens=max_tokens, ignore_eos=True),
            reply_subject="unused",
        )

    def prefill_ms(engine, tag: str) -> float:
        engine.add_request(request(tag, prompt, 1))
        started = time.perf_counter()
        engine.step()  # the whole 512-token prompt in one chunk (max_num_batched_tokens 512)
        elapsed = (time.perf_counter() - started) * 1000
        while engine.has_unfinished_requests():
            engine.step()
        return elapsed

    def decode_ms(engine, batch: int, tag: str) -> float:
        for i in range(batch):
            engine.add_request(request(f"{tag}-{i}", prompt[i : i + 16], args.output_len))
        steps = []
        while engine.has_unfinished_requests():
            ready = len(engine.scheduler.running) == batch and all(
                s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running
            )
            started = time.perf_counter()
            engine.step()
            if ready:
                steps.append((time.perf_counter() - started) * 1000)
        return statistics.median(steps)

    found: dict[tuple[str, str], list[float]] = {}
    for repetition in range(args.repetitions + 1):  # the first is a warm-up
        order = quants if repetition % 2 == 0 else quants[::-1]
        for quant in order:
            samples = {"prefill 512": prefill_ms(engines[quant], f"p{repetition}")}
            for batch in batches:
                samples[f"decode b={batch}"] = decode_ms(engines[quant], batch, f"d{repetition}-{batch}")
            for what, ms in samples.items():
                if repetition:
                    found.setdefault((quant, what), []).append(ms)
                sys.stdout.write(f"rep {repetition} {quant:<5} {what:<12} {ms:8.1f} ms\n")
            sys.stdout.flush()
    sys.stdout.write("\nmedian ms; x = none / fp16 (>1: fp16 faster), median of per-repetition ratios\n")
    for what in ["prefill 512", *(f"decode b={b}" for b in batches)]:
        dense, fp16 = found[("none", what)], found[("fp16", what)]
        ratio = statistics.median(d / f for d, f in zip(dense, fp16, strict=True))
        sys.stdout.write(
            f"{what:<12} none {statistics.median(dense):8.1f}  fp16 {statistics.median(fp16):8.1f}  x {ratio:.2f}\n"
        )


def quality_main(args: argparse.Namespace) -> None:
    """Perplexity of a held English text (prompt logprobs) and greedy chat answers, `none` against `fp16`."""
    import math

    from contracts import GenerateRequest, SamplingParams
    from ops.bench.workloads import realistic_requests

    engines = {quant: load_engine(quant, 8, args.torch_threads) for quant in ("none", "fp16")}
    tokenizer = engines["none"].tokenizer
    text_ids = tokenizer.encode(Path("docs/architecture.md").read_text(), add_special_tokens=False)[: args.text_tokens]
    chats = []
    for chat in realistic_requests(0, args.prompts):
        text = tokenizer.apply_chat_template(list(chat.messages), add_generation_prompt=True, tokenize=False)
        chats.append(tokenizer.encode(text, add_special_tokens=False))

    def run(engine, prompts: list[list[int]], **sampling) -> list[list]:
        for i, prompt in enumerate(prompts):
            engine.add_request(
                GenerateRequest(
                    request_id=f"q{i}",
                    model="bench",
                    prompt_token_ids=prompt,
                    sampling=SamplingParams(temperature=0.0, ignore_eos=True, **sampling),
                    reply_subject="unused",
                )
            )
        found: dict[str, list] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                found.setdefault(output.request_id, []).append(output)
        return [found[f"q{i}"] for i in range(len(prompts))]

    greedy = {}
    for quant, engine in engines.items():
        [outputs] = run(engine, [text_ids], max_tokens=1, prompt_logprobs=0)
        logprobs = [lp.logprob for lp in outputs[0].prompt_logprobs if lp is not None]
        sys.stdout.write(f"{quant}: perplexity {math.exp(-sum(logprobs) / len(logprobs)):.3f} over {len(logprobs)}\n")
        answers = run(engine, chats, max_tokens=args.output_len)
        greedy[quant] = [[t for out in outs for c in out.choices for t in c.token_ids] for outs in answers]
    same, agreeing = 0, 0
    for dense, fp16 in zip(greedy["none"], greedy["fp16"], strict=True):
        first = next((i for i, (a, b) in enumerate(zip(dense, fp16, strict=True)) if a != b), len(dense))
        same += first == len(dense)
        agreeing += first
    total = sum(len(answer) for answer in greedy["none"])
    sys.stdout.write(f"greedy: {same} of {len(chats)} answers identical; {agreeing} of {total} tokens before a split\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    kernel = sub.add_parser("kernel")
    kernel.add_argument("--rows", default="1,4,16,32,64,256,512")
    kernel.add_argument("--lm-head-max-rows", type=int, default=64, help="lm_head only sees the sampled rows")
    kernel.add_argument("--repetitions", type=int, default=5)
    kernel.add_argument("--torch-threads", type=int, default=1)
    engine = sub.add_parser("engine")
    engine.add_argument("--batch", default="1,32")
    engine.add_argument("--output-len", type=int, default=32)
    engine.add_argument("--repetitions", type=int, default=3)
    engine.add_argument("--torch-threads", type=int, default=1)
    quality = sub.add_parser("quality")
    quality.add_argument("--text-tokens", type=int, default=600)
    quality.add_argument("--prompts", type=int, default=6)
    quality.add_argument("--output-len", type=int, default=64)
    quality.add_argument("--torch-threads", type=int, default=1)
    rss = sub.add_parser("rss")
    rss.add_argument("--quant", default="none")
    args = parser.parse_args()
    commands = {"kernel": kernel_main, "engine": engine_main, "quality": quality_main, "rss": rss_main}
    commands[args.command](args)


if __name__ == "__main__":
    main()
