"""Measure the compiled small-step path (`compile_decode`, engine_worker/compiled_decode.py) against the eager
forward: the engine alone (no NATS, no HTTP), the default SmolLM2 model, realistic chat questions (the bench's
`--workload realistic` set, chat template applied) sampled at temperature 0.8 with per-request seeds.

Two engines in one process, one eager and one compiled; per repetition and batch size they run in a shuffled
order, so a machine busier for a while skews both alike: on a shared machine read the ratios, not the absolute
numbers. The compiled engine first compiles the row buckets these batch sizes reach (with drafts: batch x (1 +
speculative tokens) rows), reported in seconds; inductor caches them on disk, so a second run is faster.

    PYTHONPATH=$PWD python scripts/compiled_decode_bench.py --batch 1,4 --repetitions 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from common.engine_config import EngineConfig
from common.settings import Settings
from contracts import GenerateRequest, SamplingParams
from engine_worker.compiled_decode import DEFAULT_BUCKETS, CompiledDecode, bucket_for
from engine_worker.engine import Engine
from engine_worker.loader import resolve_model
from ops.bench.workloads import realistic_requests

MODES = ("eager", "compiled")


def run_once(engine: Engine, batch: int, output_len: int, seed: int, tag: str) -> dict[str, float]:
    """One batch of chat questions to completion: the median wall time of the steps that decoded every sequence,
    and generated tokens over the whole run's time (prefill included)."""
    for i, chat in enumerate(realistic_requests(seed, batch)):
        text = engine.tokenizer.apply_chat_template(list(chat.messages), add_generation_prompt=True, tokenize=False)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)  # as the api renders a chat
        engine.add_request(
            GenerateRequest(
                request_id=f"{tag}-{seed}-{i}",
                model="bench",
                prompt_token_ids=list(prompt),
                sampling=SamplingParams(temperature=0.8, seed=chat.seed, max_tokens=output_len, ignore_eos=True),
                reply_subject="unused",
            )
        )
    steps: list[float] = []
    tokens = 0
    started_all = time.perf_counter()
    while engine.has_unfinished_requests():
        prefilled = all(seq.num_computed_tokens >= seq.num_prompt_tokens for seq in engine.scheduler.running)
        running_before = len(engine.scheduler.running)
        started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - started
        tokens += sum(len(choice.token_ids) for output in outputs for choice in output.choices)
        if running_before == batch and prefilled:
            steps.append(elapsed)
    total = time.perf_counter() - started_all
    return {"step_ms": statistics.median(steps) * 1000, "tok_s": tokens / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--torch-threads", type=int, default=1, help="1: what `inferq serve` gives a 2-core box")
    parser.add_argument("--speculative-tokens", type=int, default=4, help="n-gram drafts (the serve default: 4)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the served models' cache")
    args = parser.parse_args()
    model = resolve_model("SmolLM2-135M-Instruct", args.cache_dir or Settings().model_cache_dir)
    batches = [int(part) for part in args.batch.split(",")]
    config = EngineConfig(
        max_num_seqs=max(batches),
        max_model_len=1024,
        torch_threads=args.torch_threads,
        num_speculative_tokens=args.speculative_tokens,
    )
    engines = {mode: Engine.from_pretrained(model.local_dir, config) for mode in MODES}
    # The compiled engine gets only the buckets these batch sizes reach (what `compile_decode` does with all four),
    # so a run on a busy box does not spend its time compiling graphs it never uses.
    runner = engines["compiled"].runner
    rows = {batch * (1 + args.speculative_tokens) for batch in batches} | set(batches)
    buckets = sorted({bucket for row in rows if (bucket := bucket_for(row, DEFAULT_BUCKETS)) is not None})
    runner.compiled_decode = CompiledDecode(runner, buckets=buckets)
    started = time.perf_counter()
    with torch.inference_mode():
        runner.compiled_decode.warm_up()
    sys.stdout.write(f"compiled buckets {buckets} in {time.perf_counter() - started:.1f} s\n")
    compiled = engines["compiled"].runner.compiled_decode
    for batch in batches:  # warm-up of both engines (allocator, caches, the first relayouts)
        for mode in MODES:
            started = time.perf_counter()
            run_once(engines[mode], batch, 24, seed=-1, tag=f"warm-{mode}")
            sys.stdout.write(f"warm-up batch {batch} {mode}: {time.perf_counter() - started:.1f} s\n")
    sys.stdout.write(f"graphs compiled: {compiled.num_compiles} for buckets {dict(compiled.steps_by_bucket)}\n")
    rng = random.Random(0)
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for repetition in range(args.repetitions):
        for batch in batches:
            for mode in rng.sample(MODES, len(MODES)):
                result = run_once(engines[mode], batch, args.output_len, seed=repetition, tag=mode)
                results.setdefault((batch, mode), []).append(result)
                sys.stdout.write(
                    f"rep {repetition} batch {batch:>2} {mode:<9} step {result['step_ms']:.2f} ms "
                    f"tok/s {result['tok_s']:.2f}\n"
                )
                sys.stdout.flush()
    sys.stdout.write(
        f"graphs compiled after the runs: {compiled.num_compiles} (steps per bucket {dict(compiled.steps_by_bucket)})\n"
        "\nmedians over repetitions; speed-up = eager / compiled step time and tok/s x = compiled / eager tok/s "
        "(each the median of the per-repetition ratios)\n"
        f"{'batch':>5} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9} {'eager tok/s':>12} {'compiled tok/s':>15} "
        f"{'tok/s x':>8}\n"
    )
    for batch in batches:
        eager, comp = results[(batch, "eager")], results[(batch, "compiled")]
        eager_ms, comp_ms = (statistics.median(r["step_ms"] for r in rs) for rs in (eager, comp))
        eager_tok, comp_tok = (statistics.median(r["tok_s"] for r in rs) for rs in (eager, comp))
        step_ratio = statistics.median(e["step_ms"] / c["step_ms"] for e, c in zip(eager, comp, strict=True))
        tok_ratio = statistics.median(c["tok_s"] / e["tok_s"] for e, c in zip(eager, comp, strict=True))
        sys.stdout.write(
            f"{batch:>5} {eager_ms:>9.2f} {comp_ms:>12.2f} {step_ratio:>9.3f} {eager_tok:>12.2f} {comp_tok:>15.2f} "
            f"{tok_ratio:>8.3f}\n"
        )


if __name__ == "__main__":
    main()
