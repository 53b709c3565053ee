"""Measure lower-precision weights against the dense ones (docs/quantization.md, `weight_quant`).

`kernel`: for SmolLM2-135M's linear shapes (fused q/k/v, o, fused gate/up, down, lm_head), random weights in
`--dtype`, 1) whether each kernel is batch-invariant bit for bit: each row computed alone against the same row
inside calls of M rows; 2) time per call of each kernel, interleaved, median. Kernels: `dense` (oneDNN's pre-packed
GEMM, the runner's dense path), `dense32` (the same over fp32 weights), `F.linear`, `fp16` (fbgemm, rows padded
to 6, fp32 activations), `int8`, `int4` (the runner's own kernels from weight_quant.py, activations in `--dtype`).

`engine`: engines of the packaged SmolLM2 in one process, one per `--quants` mode, a 512-token prefill chunk and
decode steps at the given batch sizes, interleaved, median step time; and the resident memory a runner adds when it
loads (VmRSS before and after, each engine measured in a fresh subprocess).

`quality`: perplexity of a held English text (prompt logprobs over docs/architecture.md) and greedy chat answers
(the bench's realistic questions), each mode of `--quants` against the first.

    PYTHONPATH=$PWD python scripts/weight_quant_bench.py kernel --dtype float32 --kernels dense,fp16,F.linear
    PYTHONPATH=$PWD python scripts/weight_quant_bench.py kernel --dtype bfloat16 --kernels dense,int8,int4
    PYTHONPATH=$PWD python scripts/weight_quant_bench.py engine --dtype float32 --quants none,fp16 --batch 1,32
    PYTHONPATH=$PWD python scripts/weight_quant_bench.py quality --dtype bfloat16 --quants none,int8,int4
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

from engine_worker.weight_quant import Int8WeightOnly, _fp16_tiled, _int4_cpu

SHAPES = {  # (out, in) of SmolLM2-135M's GEMMs as the runner fuses them
    "qkv 960x576": (960, 576),
    "o 576x576": (576, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}
INVARIANCE_ROWS = (2, 3, 4, 7, 16, 17, 32, 33, 64, 128, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Kernel = Callable[[torch.Tensor], torch.Tensor]


def _dense_onednn(weight: torch.Tensor) -> Kernel:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _in_fp32(kernel: Kernel) -> Kernel:
    """A kernel over fp32 weights called with activations of another dtype (bf16: dtype=float32 against auto)."""
    return lambda x: kernel(x.float()).to(x.dtype)


KERNELS: dict[str, Callable[[torch.Tensor], Kernel]] = {
    "dense": _dense_onednn,  # the runner's dense path
    "dense32": lambda weight: _in_fp32(_dense_onednn(weight.float())),
    "F.linear": lambda weight: functools.partial(F.linear, weight=weight),
    "fp16": lambda weight: _in_fp32(
        functools.partial(_fp16_tiled, torch.ops.quantized.linear_prepack_fp16(weight.float(), None))
    ),
    "int8": lambda weight: Int8WeightOnly(weight, None),
    "int4": lambda weight: _int4_cpu(weight, None),
}


def kernels(weight: torch.Tensor, names: list[str]) -> dict[str, Kernel]:
    return {name: KERNELS[name](weight) for name in names}


def check_invariance(name: str, weight: torch.Tensor, names: list[str], out: list[str]) -> None:
    x = torch.randn(max(INVARIANCE_ROWS), weight.shape[1], generator=torch.Generator().manual_seed(1))
    x = x.to(weight.dtype)
    for kernel_name, kernel in kernels(weight, names).items():
        alone = torch.cat([kernel(x[i : i + 1]) for i in range(x.shape[0])])
        failures = []
        for rows in INVARIANCE_ROWS:
            for start in (0, 1):  # the same rows at other positions inside the call, too
                batched = kernel(x[start : start + rows])
                if not torch.equal(batched, alone[start : start + rows]):
                    worst = (batched - alone[start : start + rows]).abs().max().item()
                    failures.append(f"M={rows}@{start} (max diff {worst:.2e})")
        verdict = "bitwise invariant" if not failures else "DIFFERS at " + ", ".join(failures[:4])
        out.append(f"{name:<18} {kernel_name:<9} {verdict}")


def time_calls(
    weight: torch.Tensor, names: list[str], rows: list[int], repetitions: int
) -> dict[tuple[str, int], float]:
    """Median ms per call; within a repetition the kernels alternate, so a busier moment skews them alike."""
    found: dict[tuple[str, int], list[float]] = {}
    named = kernels(weight, names)
    for m in rows:
        x = torch.randn(m, weight.shape[1]).to(weight.dtype)
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
    names = args.kernels.split(",")
    dtype = DTYPES[args.dtype]
    lines: list[str] = []
    with torch.inference_mode():
        if not args.skip_invariance:
            for name, (n, k) in SHAPES.items():
                weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
                check_invariance(name, weight, names, lines)
        sys.stdout.write(
            "\n".join(lines) + f"\n\n{args.dtype}, {args.torch_threads} thread(s): ms per call (median); "
            f"x = {names[0]} / kernel (>1: faster than {names[0]})\n"
        )
        for name, (n, k) in SHAPES.items():
            weight = (torch.randn(n, k) * 0.05).to(dtype)
            shape_rows = [m for m in rows if m <= args.lm_head_max_rows or not name.startswith("lm_head")]
            times = time_calls(weight, names, shape_rows, args.repetitions)
            for m in shape_rows:
                base = times[(names[0], m)]
                cells = "  ".join(f"{kn} {times[(kn, m)]:7.3f} x{base / times[(kn, m)]:5.2f}" for kn in names)
                sys.stdout.write(f"{name:<18} M={m:<4} {cells}\n")
                sys.stdout.flush()


def load_engine(args: argparse.Namespace, quant: str, max_num_seqs: int, threads: int):
    """`quant` is a weight_quant mode, optionally with its own dtype (`none:float32`) instead of `--dtype`."""
    from common.engine_config import EngineConfig
    from common.settings import Settings
    from engine_worker.engine import Engine
    from engine_worker.loader import resolve_model

    model = resolve_model("SmolLM2-135M-Instruct", Settings().model_cache_dir)
    quant, _, dtype = quant.partition(":")
    config = EngineConfig(
        dtype=dtype or args.dtype,
        max_num_seqs=max_num_seqs,
        max_model_len=1024,
        torch_threads=threads,
        num_speculative_tokens=0,
        prefix_caching=False,
        weight_quant=quant,
        weight_quant_max_rows=args.max_rows,
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
    engine = load_engine(args, args.quant, 8, 1)
    after = vm_rss_mib()
    sys.stdout.write(json.dumps({"quant": args.quant, "before": before, "after": after, "ok": engine is not None}))


def _request(tag: str, prompt_ids: list[int], max_tokens: int, **sampling):
    from contracts import GenerateRequest, SamplingParams

    return GenerateRequest(
        request_id=tag,
        model="bench",
        prompt_token_ids=prompt_ids,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
        reply_subject="unused",
    )


def _measure_rss(args: argparse.Namespace, quants: list[str]) -> None:
    rss: dict[str, list[dict]] = {}
    for quant in quants * 2:  # each twice, alternating: a fresh process per load
        command = [sys.executable, __file__, "rss", "--quant", quant, "--dtype", args.dtype]
        done = subprocess.run([*command, "--max-rows", str(args.max_rows)], capture_output=True, text=True, check=True)
        rss.setdefault(quant, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    for quant in quants:
        for sample in rss[quant]:
            sys.stdout.write(
                f"rss {quant:<5} before {sample['before']:.0f} MiB after load {sample['after']:.0f} MiB "
                f"(+{sample['after'] - sample['before']:.0f})\n"
            )


def engine_main(args: argparse.Namespace) -> None:
    """Decode steps of all engines alternate (one step of each in turn), so a busier moment skews them alike."""
    batches = [int(part) for part in args.batch.split(",")]
    quants = args.quants.split(",")
    if not args.skip_rss:
        _measure_rss(args, quants)
    engines = {quant: load_engine(args, quant, max(batches), args.torch_threads) for quant in quants}
    for quant, engine in engines.items():
        head = engine.runner.lm_head
        sys.stdout.write(
            f"{quant}: lm_head {head.quant and head.quant.name} dense kept {head.keeps_dense} "
            f"embedding {engine.runner.embed.dtype}\n"
        )
    prompt = list(range(1000, 1000 + 512))
    sampling = {"temperature": 0.8, "seed": 1}

    def prefill_ms(engine, tag: str) -> float:
        engine.add_request(_request(tag, prompt, 1, **sampling))
        started = time.perf_counter()
        engine.step()  # the whole 512-token prompt in one chunk (max_num_batched_tokens 512)
        elapsed = (time.perf_counter() - started) * 1000
        while engine.has_unfinished_requests():
            engine.step()
        return elapsed

    def ready(engine, batch: int) -> bool:
        running = engine.scheduler.running
        return len(running) == batch and all(s.num_computed_tokens >= s.num_prompt_tokens for s in running)

    found: dict[tuple[str, str], list[float]] = {}
    for repetition in range(args.repetitions + 1):  # the first is a warm-up
        order = quants if repetition % 2 == 0 else quants[::-1]
        for quant in order:
            ms = prefill_ms(engines[quant], f"p{repetition}")
            if repetition:
                found.setdefault((quant, "prefill 512"), []).append(ms)
    for batch in batches:
        for engine in engines.values():
            for i in range(batch):
                engine.add_request(_request(f"d{batch}-{i}", prompt[i : i + 16], args.output_len + 1, **sampling))
        while any(engine.has_unfinished_requests() for engine in engines.values()):
            for quant, engine in engines.items():
                if not engine.has_unfinished_requests():
                    continue
                timed = ready(engine, batch)
                started = time.perf_counter()
                engine.step()
                if timed:
                    found.setdefault((quant, f"decode b={batch}"), []).append((time.perf_counter() - started) * 1000)
    base = quants[0]
    sys.stdout.write(f"\nmedian ms; x = {base} / mode (>1: faster than {base})\n")
    for what in ["prefill 512", *(f"decode b={b}" for b in batches)]:
        cells = []
        for quant in quants:
            times = found[(quant, what)]
            ratio = statistics.median(found[(base, what)]) / statistics.median(times)
            cells.append(f"{quant} {statistics.median(times):8.1f} (n={len(times)}) x{ratio:5.2f}")
        sys.stdout.write(f"{what:<12} " + "  ".join(cells) + "\n")


def quality_main(args: argparse.Namespace) -> None:
    """Perplexity of a held English text (prompt logprobs) and greedy chat answers, each mode against the first."""
    import math

    from ops.bench.workloads import realistic_requests

    quants = args.quants.split(",")
    engines = {quant: load_engine(args, quant, 8, args.torch_threads) for quant in quants}
    tokenizer = engines[quants[0]].tokenizer
    text_ids = tokenizer.encode(Path("docs/architecture.md").read_text(), add_special_tokens=False)[: args.text_tokens]
    chats = []
    for chat in realistic_requests(0, args.prompts):
        text = tokenizer.apply_chat_template(list(chat.messages), add_generation_prompt=True, tokenize=False)
        chats.append(tokenizer.encode(text, add_special_tokens=False))

    def run(engine, prompts: list[list[int]], resumes: list[list[int]] | None = None, **sampling) -> list[list]:
        """Greedy, `--chat-batch` prompts at a time (decode steps of that many rows)."""
        found: dict[str, list] = {}
        for first in range(0, len(prompts), args.chat_batch):
            for i in range(first, min(first + args.chat_batch, len(prompts))):
                request = _request(f"q{i}", prompts[i], temperature=0.0, **sampling)
                if resumes is not None:  # as the edge resubmits a request after its worker died: one big prefill
                    request = request.model_copy(update={"attempt": 2, "resume_token_ids": resumes[i]})
                engine.add_request(request)
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
        # Resumed from the first half of each answer, the rest must be the same tokens (docs/reliability.md).
        half = args.output_len // 2
        resumed = run(engine, chats, [answer[:half] for answer in greedy[quant]], max_tokens=args.output_len)
        rest = [[t for out in outs for c in out.choices for t in c.token_ids] for outs in resumed]
        same = sum(answer[half:] == tail for answer, tail in zip(greedy[quant], rest, strict=True))
        sys.stdout.write(f"{quant}: resumed after {half} tokens, {same} of {len(chats)} continuations identical\n")
    for quant in quants[1:]:
        same, agreeing = 0, 0
        for dense, other in zip(greedy[quants[0]], greedy[quant], strict=True):
            first = next((i for i, (a, b) in enumerate(zip(dense, other, strict=True)) if a != b), len(dense))
            same += first == len(dense)
            agreeing += first
        total = sum(len(answer) for answer in greedy[quants[0]])
        sys.stdout.write(
            f"greedy {quant} vs {quants[0]}: {same} of {len(chats)} answers identical; "
            f"{agreeing} of {total} tokens before a split\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    kernel = sub.add_parser("kernel")
    kernel.add_argument("--rows", default="1,2,4,8,16,32,64,256")
    kernel.add_argument("--lm-head-max-rows", type=int, default=64, help="lm_head only sees the sampled rows")
    kernel.add_argument("--repetitions", type=int, default=5)
    kernel.add_argument("--torch-threads", type=int, default=1)
    kernel.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    kernel.add_argument("--kernels", default="dense,int8,int4", help="the first is the baseline of the ratios")
    kernel.add_argument("--skip-invariance", action="store_true")
    engine = sub.add_parser("engine")
    engine.add_argument("--batch", default="1,4,16")
    engine.add_argument("--output-len", type=int, default=32)
    engine.add_argument("--repetitions", type=int, default=3, help="of the prefill")
    engine.add_argument("--skip-rss", action="store_true")
    quality = sub.add_parser("quality")
    quality.add_argument("--text-tokens", type=int, default=600)
    quality.add_argument("--prompts", type=int, default=6)
    quality.add_argument("--output-len", type=int, default=64)
    quality.add_argument("--chat-batch", type=int, default=6, help="chat prompts decoded together")
    rss = sub.add_parser("rss")
    rss.add_argument("--quant", default="none")
    for command in (engine, quality, rss):
        command.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
        command.add_argument("--quants", default="none,int8,int4", help="modes; the first is the baseline")
        command.add_argument("--max-rows", type=int, default=16, help="weight_quant_max_rows")
        command.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    commands = {"kernel": kernel_main, "engine": engine_main, "quality": quality_main, "rss": rss_main}
    commands[args.command](args)


if __name__ == "__main__":
    main()
