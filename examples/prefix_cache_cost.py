"""What a prefix-cache hit costs against what it saves, on this machine (the figures in docs/prefix-caching.md):

    python examples/prefix_cache_cost.py copies            # store <-> slot copies, SmolLM2-135M geometry
    python examples/prefix_cache_cost.py ttft MODEL_DIR    # first-token time, prompt computed vs. cached

One torch thread, best of several runs; results go to stdout as one line per case.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 32  # SmolLM2-135M


def best(reps: int, fn: Callable[..., object], *args: object) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def copies() -> None:
    from engine_worker.prefix_store import PrefixStore

    for dtype in (torch.float32, torch.bfloat16):
        for prefix in (256, 1024, 4096):
            blocks = prefix // BLOCK
            store = PrefixStore(2 * LAYERS, 2 * blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"))
            slot_len = prefix + 256
            views = [torch.zeros(4, KV_HEADS, slot_len, HEAD_DIM, dtype=dtype) for _ in range(2 * LAYERS)]
            ids = list(range(blocks))
            store.save(views, 1, [(i, blocks + i) for i in ids])  # every page touched before timing
            store.save(views, 1, [(i, i) for i in ids])
            load = best(15, store.load, views, [(2, ids)])
            scattered = best(5, store.load, views, [(2, ids[::2] + ids[1::2])])
            save = best(15, store.save, views, 1, [(i, blocks + i) for i in ids])
            megabytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * prefix * torch.finfo(dtype).bits / 8 / 1e6
            sys.stdout.write(
                f"{dtype} prefix {prefix} tokens ({megabytes:.1f} MB): load {load * 1e3:.2f} ms "
                f"(scattered {scattered * 1e3:.2f} ms), save {save * 1e3:.2f} ms\n"
            )


def ttft(model_dir: Path) -> None:
    from contracts import GenerateRequest, SamplingParams
    from engine_worker.engine import Engine, EngineConfig

    config = EngineConfig(torch_threads=1, max_num_seqs=4, max_num_batched_tokens=2048, num_speculative_tokens=0)
    engine = Engine.from_pretrained(model_dir, config)

    def first_token(prompt: list[int], salt: str) -> tuple[float, int]:
        request = GenerateRequest(
            request_id=salt,
            model="m",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=1, temperature=0),
            reply_subject="unused",
            cache_salt=salt,
        )
        start = time.perf_counter()
        engine.add_request(request)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        return time.perf_counter() - start, outputs[-1].usage.cached_tokens

    for length in (256, 1024, 2048):
        computed, cached = [], []
        for rep in range(3):  # a new salt per repetition: the first request of each finds nothing
            prompt = [1] + [1000 + (i * 37 + rep * 11 + length) % 40000 for i in range(length - 1)]
            computed.append(first_token(prompt, f"s{length}-{rep}")[0])
            seconds, hit = first_token([*prompt, 5, 6, 7], f"s{length}-{rep}")
            cached.append(seconds)
        sys.stdout.write(
            f"{engine.dtype_name} prompt {length}: computed {min(computed):.3f} s, cached {min(cached):.3f} s "
            f"({hit} tokens cached), {min(computed) / min(cached):.1f}x\n"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["copies"]:
        copies()
    elif sys.argv[1:2] == ["ttft"] and len(sys.argv) == 3:
        ttft(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
