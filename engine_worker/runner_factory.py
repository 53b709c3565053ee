"""Which model path runs a model: the hand-written fast path (model_runner.py) for the llama layout, the generic
transformers path (generic_runner.py) for everything else.

`auto` takes the fast path when the architecture is one it implements and nothing in the config needs what
only the generic path does (a sliding window shorter than the context: the fast path would have to cap the
context at the window); `fast` and `generic` force one (`fast` still refuses other architectures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import structlog

from engine_worker.model_runner import SUPPORTED_ARCHITECTURES

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
) -> Any:
    """A ModelRunner or GenericRunner for `model_dir` (same interface). Weight quantization and threads by load
    apply to the fast path only; the generic path runs the model's own dense modules on `torch_threads`."""
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
        )
    from engine_worker.generic_runner import GenericRunner

    return GenericRunner(model_dir, **options)
