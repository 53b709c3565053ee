"""Which model path runs a model: the hand-written fast path (model_runner.py) for the llama layout, the generic
transformers path (generic_runner.py) for everything else.

`auto` takes the fast path when the architecture is one it implements and nothing in the config needs what
only the generic path does (a sliding window shorter than the context: the fast path would have to cap the
context at the window); `fast` and `generic` force one (`fast` still refuses other architectures).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from engine_worker.model_runner import SUPPORTED_ARCHITECTURES

if TYPE_CHECKING:
    from common.engine_config import EngineConfig

log = structlog.get_logger(__name__)

ModelImpl = Literal["auto", "fast", "generic"]
MODEL_IMPLS: tuple[str, ...] = ("auto", "fast", "generic")


def choose_model_impl(config: Any, requested: str = "auto", max_model_len: int | None = None) -> str:
    """ "fast" or "generic" for a transformers config."""
    if requested not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {requested!r}")
    if requested != "auto":
        return requested
    if not set(getattr(config, "architectures", None) or []) & SUPPORTED_ARCHITECTURES:
        return "generic"
    context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return "generic" if sliding and sliding < context else "fast"


def load_runner(
    model_dir: str | Path,
    *,
    model_impl: str = "auto",
    device: str,
    dtype: str,
    max_model_len: int | None,
    torch_threads: int | None,
    weight_quant: str = "none",
    weight_quant_max_rows: int = 0,
    small_step_threads: int | None = None,
    small_step_rows: int = 0,
    compile_decode: bool | Literal["auto"] = False,
) -> Any:
    """A ModelRunner or GenericRunner for `model_dir` (same interface). Weight quantization, threads by load and
    the compiled decode step apply to the fast path only; the generic path runs the model's own dense modules on
    `torch_threads`."""
    from transformers import AutoConfig

    impl = choose_model_impl(AutoConfig.from_pretrained(model_dir), model_impl, max_model_len)
    log.info("model path chosen", model_impl=impl, requested=model_impl)
    options = {"device": device, "dtype": dtype, "max_model_len": max_model_len, "torch_threads": torch_threads}
    if impl == "fast":
        from engine_worker.model_runner import ModelRunner

        return ModelRunner(
            model_dir,
            **options,
            weight_quant=weight_quant,
            weight_quant_max_rows=weight_quant_max_rows,
            small_step_threads=small_step_threads,
            small_step_rows=small_step_rows,
            compile_decode=compile_decode,
        )
    from engine_worker.generic_runner import GenericRunner

    return GenericRunner(model_dir, **options)


def load_model(model_dir: str | Path, config: EngineConfig) -> tuple[Any, Any, set[int]]:
    """What an engine is built from: the tokenizer, the runner `config.model_impl` picks, and the EOS ids (the
    tokenizer's and the generation config's)."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runner = load_runner(
        model_dir,
        model_impl=config.model_impl,
        device=config.device,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        torch_threads=config.torch_threads,
        weight_quant=config.weight_quant,
        weight_quant_max_rows=config.weight_quant_max_rows,
        small_step_threads=config.small_step_threads,
        small_step_rows=config.small_step_rows,
        compile_decode=config.compile_decode,
    )
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        generation_eos = None
    if generation_eos is not None:
        eos |= set(generation_eos) if isinstance(generation_eos, list) else {generation_eos}
    return tokenizer, runner, eos
