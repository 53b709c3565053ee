"""Where a batch-1 decode step of the default model goes, eager and compiled (`compile_decode`), in one process:
median step times of one sampled chat answer per path (alternating, twice), then a `torch.profiler` table of 20
steps of each. The engine alone (no NATS, no HTTP), the default config (int4 weight copies on an AVX-512 CPU with
bf16), no drafts; only the 1-row bucket is compiled (about a minute).

    PYTHONPATH=$PWD python scripts/profile_small_step.py --threads 2 [--as-served]

`--as-served` sizes the engine as `inferq serve` does (64 slots, the 2 GiB KV cache).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common.engine_config import EngineConfig
from common.settings import Settings
from contracts import GenerateRequest, SamplingParams
from engine_worker.compiled_decode import CompiledDecode
from engine_worker.engine import Engine
from engine_worker.loader import resolve_model
from ops.bench.workloads import realistic_requests


def answer(engine: Engine, prompt: list[int], tag: str, profile: bool) -> float:
    """One answer of 120 tokens; the median step time in ms (a profiler table of steps 60-80 when `profile`)."""
    engine.add_request(
        GenerateRequest(
            request_id=tag,
            model="profile",
            prompt_token_ids=prompt,
            sampling=SamplingParams(temperature=0.8, seed=1, max_tokens=120, ignore_eos=True),
            reply_subject="unused",
        )
    )
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    times: list[float] = []
    while engine.has_unfinished_requests():
        if profile and len(times) == 60:
            profiler.__enter__()
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
        if profile and len(times) == 80:
            profiler.__exit__(None, None, None)
            sys.stdout.write(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) + "\n")
    steady = sorted(times[5:])
    return steady[len(steady) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a lone stream under serve: 2)")
    parser.add_argument(
        "--as-served",
        action="store_true",
        help="inferq serve's engine sizes (64 slots, a 2 GiB KV cache) instead of one slot of 1,024 tokens",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model("SmolLM2-135M-Instruct", Settings().model_cache_dir)
    sizes = {} if args.as_served else {"max_num_seqs": 1, "max_model_len": 1024}
    config = EngineConfig(torch_threads=args.threads, num_speculative_tokens=0, **sizes)
    engine = Engine.from_pretrained(model.local_dir, config)
    runner = engine.runner
    started = time.perf_counter()
    compiled = CompiledDecode(runner, buckets=(1,))
    with torch.inference_mode():
        compiled.warm_up()
    sys.stdout.write(f"compiled the 1-row bucket in {time.perf_counter() - started:.0f} s\n")
    chat = realistic_requests(3, 1)[0]
    text = engine.tokenizer.apply_chat_template(list(chat.messages), add_generation_prompt=True, tokenize=False)
    prompt = list(engine.tokenizer.encode(text, add_special_tokens=False))
    for repetition in range(3):
        profile = repetition == 2
        for name, path in (("eager", None), ("compiled", compiled)):
            runner.compiled_decode = path
            step_ms = answer(engine, prompt, f"{name}-{repetition}", profile)
            sys.stdout.write(f"{name:<9} median step {step_ms:.2f} ms\n")


if __name__ == "__main__":
    main()
