"""Measure what structured outputs cost the engine's decode step, with the token masks filled before the forward
pass (`overlap` off: the old way) or on the mask thread while it runs (`overlap` on), next to the same batch
unconstrained. In-process (no NATS, no HTTP), the default SmolLM2 model, greedy, the bench's JSON schema
(ops/bench/structured.py) on every constrained request.

Runs are interleaved (free, sync, overlap in a shuffled order per repetition) so a machine busier for a while
skews every mode alike; read the ratios, not the absolute numbers, on a shared machine.

    PYTHONPATH=$PWD python scripts/structured_mask_overlap.py --batch 1,32 --repetitions 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from common.engine_config import EngineConfig
from contracts import GenerateRequest, SamplingParams
from contracts.constraints import JsonSchemaConstraint
from engine_worker.engine import Engine
from engine_worker.loader import resolve_model
from ops.bench.prompts import prompt_token_ids
from ops.bench.structured import BENCH_SCHEMA

MODES = ("free", "sync", "overlap")


def run_once(engine: Engine, batch: int, mode: str, output_len: int, seed: int) -> dict[str, float]:
    """One batch to completion; the mean wall time of the decode steps that sampled every sequence, and the
    mean time the mask fill itself took per such step."""
    engine.structured.overlap = mode == "overlap"
    constraint = None if mode == "free" else JsonSchemaConstraint(json_schema=BENCH_SCHEMA, strict=True)
    for i in range(batch):
        engine.add_request(
            GenerateRequest(
                request_id=f"{mode}-{seed}-{i}",
                model="bench",
                prompt_token_ids=prompt_token_ids(seed, i, 32),
                sampling=SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True),
                reply_subject="unused",
                constraint=constraint,
            )
        )
    fill_seconds: list[float] = []
    filler = engine.structured._filler
    original = filler.fill_with_drafts if filler is not None else None
    if filler is not None:

        def timed_fill(*args, **kwargs) -> None:
            started = time.perf_counter()
            original(*args, **kwargs)
            fill_seconds.append(time.perf_counter() - started)

        filler.fill_with_drafts = timed_fill
    steps: list[float] = []
    tokens = 0
    started_all = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            running_before = len(engine.scheduler.running)
            started = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - started
            tokens += sum(len(choice.token_ids) for output in outputs for choice in output.choices)
            if running_before == batch:  # every sequence admitted: decode steps (the first may end a prefill)
                steps.append(elapsed)
    finally:
        if filler is not None:
            filler.fill_with_drafts = original
    total = time.perf_counter() - started_all
    return {
        "step_ms": statistics.mean(steps[1:] or steps) * 1000,  # the first full step may still warm up
        "tok_s": tokens / total,
        "fill_ms": statistics.mean(fill_seconds) * 1000 if fill_seconds else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1, help="1: robust on a machine shared with others")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/structured-bench-data/models"))
    args = parser.parse_args()
    model = resolve_model("SmolLM2-135M-Instruct", args.cache_dir)
    batches = [int(part) for part in args.batch.split(",")]
    engine = Engine.from_pretrained(
        model.local_dir, EngineConfig(max_num_seqs=max(batches), max_model_len=512, torch_threads=args.torch_threads)
    )
    rng = random.Random(0)
    run_once(engine, 2, "overlap", 8, seed=-1)  # warm-up: the llguidance tokenizer, the grammar cache, torch
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for repetition in range(args.repetitions):
        for batch in batches:
            for mode in rng.sample(MODES, len(MODES)):
                result = run_once(engine, batch, mode, args.output_len, seed=repetition)
                results.setdefault((batch, mode), []).append(result)
                line = " ".join(f"{key} {value:.2f}" for key, value in result.items())
                sys.stdout.write(f"rep {repetition} batch {batch:>2} {mode:<8} {line}\n")
                sys.stdout.flush()
    sys.stdout.write("\nmedians over repetitions; ratios against free (unconstrained) at the same batch\n")
    sys.stdout.write(f"{'batch':>5} {'mode':<8}{'step ms':>9}{'tok/s':>9}{'fill ms':>9}{'step x':>8}{'tok/s x':>9}\n")
    for batch in batches:
        free = {key: statistics.median(r[key] for r in results[(batch, "free")]) for key in ("step_ms", "tok_s")}
        for mode in MODES:
            med = {
                key: statistics.median(r[key] for r in results[(batch, mode)])
                for key in ("step_ms", "tok_s", "fill_ms")
            }
            sys.stdout.write(
                f"{batch:>5} {mode:<8}{med['step_ms']:>9.2f}{med['tok_s']:>9.1f}{med['fill_ms']:>9.2f}"
                f"{med['step_ms'] / free['step_ms']:>8.3f}{med['tok_s'] / free['tok_s']:>9.3f}\n"
            )


if __name__ == "__main__":
    main()
