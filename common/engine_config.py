"""The engine's knobs: the one place their defaults and bounds are declared. `Settings` takes these fields over
(same names, so `INFERQ_MAX_NUM_SEQS` and `--max-num-seqs` still work) and builds an `EngineConfig` for the
worker (`Settings.engine_config()`); tests build one directly. Plain data, no torch: it sits in the bottom layer
beside the settings, so both the settings and the engine can import it."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

DEFAULT_KV_CACHE_GIB = 2.0
# Sized on the #18 multi-turn workload within the default start's 1.5 GiB (docs/prefix-caching.md, benchmarks.md).
DEFAULT_PREFIX_CACHE_MAX_MIB = 64.0


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = Field(
        default=64,
        ge=1,
        description=("Sequences decoded together (batch slots). A request with n (or best_of) choices uses that many."),
    )
    max_num_batched_tokens: int = Field(
        default=512,
        ge=1,
        description=(
            "Token budget per engine step: decodes (1 token each, plus their draft tokens) and prefill chunks."
        ),
    )
    max_model_len: int | None = Field(
        default=None, ge=2, description=("Cap on the context length; the model's own when unset.")
    )
    kv_cache_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "KV capacity in tokens; unset: max_num_seqs x max_model_len, capped by kv_cache_gib and 40% of the "
            "available memory (engine_worker/kv_budget.py, logged as kv_cache.sized). On a CPU it is committed as "
            "sequences use it."
        ),
    )
    kv_cache_gib: float = Field(
        default=DEFAULT_KV_CACHE_GIB,
        gt=0,
        description=(
            "Memory cap for the derived default of kv_cache_tokens (2 GiB: ~93k tokens of SmolLM2-135M in bf16)."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "auto: bfloat16 on CUDA (float16 before Ampere) and on CPUs with native bf16 (avx512_bf16/AMX), else "
            "float32. float32 is the correctness reference."
        ),
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps.*|xpu.*)$",
        description="auto (cuda if available), cpu, cuda, cuda:1, ...",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch intra-op threads (default: torch's; under `inferq serve`, one core is left to the api and NATS)."
        ),
    )
    num_speculative_tokens: int = Field(
        default=4,
        ge=0,
        description=(
            "N-gram speculative decoding: draft tokens guessed per sequence and step from its own text (0: off)."
        ),
    )
    prompt_lookup_min: int = Field(default=2, ge=1, description="Shortest n-gram the draft proposer matches.")
    prompt_lookup_max: int = Field(default=4, ge=1, description="Longest n-gram the draft proposer matches.")
    speculative_max_rows: int = Field(
        default=4,
        ge=2,
        description=(
            "Draft only while a step's decodes plus their drafts fit in this many rows: each decode gets up to "
            "`speculative_max_rows // decodes - 1` drafts, so speculation fades out as the batch grows (at a large "
            "batch the GEMMs are compute-bound and a rejected draft costs a full row). 4 keeps a drafted step "
            "within the rows the int4 weight copies cover (weight_quant_max_rows); on natural text, where drafts "
            "rarely hit, 16 was 4-13% slower at 1-4 streams (docs/benchmarks.md)."
        ),
    )
    prefix_caching: bool = Field(
        default=True,
        description=(
            "Automatic prefix caching: prompt KV is kept after a request and reused by later requests of the same "
            "owner whose prompts start with the same 32-token blocks (docs/prefix-caching.md)."
        ),
    )
    prefix_cache_max_mib: float = Field(
        default=DEFAULT_PREFIX_CACHE_MAX_MIB,
        gt=0,
        description=(
            "Memory bound of the prefix cache's store, in MiB of KV, and at most a quarter of the KV capacity "
            "(logged as prefix_cache.sized). Least recently used blocks make way beyond it; on a CPU the pages of "
            "evicted blocks go back to the OS. 64 MiB: 45 blocks of SmolLM2-135M in fp32 (1,440 tokens: a "
            "~1,200-token system prompt and the latest turns), twice that in bf16 (docs/prefix-caching.md)."
        ),
    )
    model_impl: Literal["auto", "fast", "generic"] = Field(
        default="auto",
        description=(
            "Model path: auto (the fast llama-layout forward where it applies, else any transformers decoder through "
            "its own layers with the engine's attention), fast, or generic (docs/models.md, runner_factory.py)."
        ),
    )

    weight_quant: Literal["auto", "none", "fp16", "int8", "int4"] = Field(
        default="auto",
        description=(
            "Lower-precision weights (fast path; docs/quantization.md). fp16: fp32 models on a CPU keep only fp16 "
            "weights (embedding and lm_head included) and run every call on them: half the weight memory, faster "
            "small steps, and each row's result independent of the batch; a no-op for 16-bit models and on GPUs. "
            "int8, int4 (AVX-512 CPUs; int8 elsewhere; int4 keeps lm_head in int8): copies beside the dense weights "
            "for steps of at most weight_quant_max_rows rows. auto (default), for models with at least 64 MiB of "
            "weights: int4 for a bf16 model on an AVX-512 CPU, else fp16. none: the model's own weights."
        ),
    )
    weight_quant_max_rows: int = Field(
        default=4,
        ge=0,
        description=(
            "int8/int4 only: a step with at most this many rows (decoded tokens, drafts included) runs the quantized "
            "copy; larger steps run the dense weights (torch's int kernels cost time per row: measured on SmolLM2, "
            "int4 1.4x faster at 4 rows, 0.9x at 8). fp16 weights run every step."
        ),
    )
    small_step_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch threads for a step of at most small_step_rows rows (one or a few sequences decoding, when the "
            "api and NATS are mostly idle); larger steps use torch_threads. Unset: torch_threads for every step."
        ),
    )
    small_step_rows: int = Field(
        default=8,
        ge=0,
        description=(
            "The largest step (rows, drafts included) that runs on small_step_threads. 8 covers four streams and "
            "a lone stream's draft tokens: measured 1.15x at 4 concurrent chats over 2 rows, and no loss at 16 or "
            "32 (docs/benchmarks.md, threads by load)."
        ),
    )
    compile_decode: bool | Literal["auto"] = Field(
        default=False,
        description=(
            "torch.compile steps of at most 4 rows (decodes of 1-4 sequences with their drafts; fast path only): "
            "rows padded to buckets 1, 2, 4, one graph per bucket. On a CPU the buckets compile on a thread of "
            "their own while the worker already serves eager (under a minute from inductor's cache, ~2-3 minutes "
            "on a new machine; /health counts the workers still compiling); elsewhere before it serves. Larger "
            "steps and prompt logprobs stay eager. On a CPU an int8 lm_head copy (bf16) is compiled first through "
            "inductor's GEMM template (docs/quantization.md). auto: on a CPU, off elsewhere (CUDA graphs are not "
            "wired). "
            "inferq serve starts with auto; an EngineConfig built by hand compiles only when asked "
            "(docs/compiled-decode.md)."
        ),
    )

    def __post_init__(self) -> None:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"need prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and "
                f"{self.prompt_lookup_max}"
            )


def engine_field(name: str, **overrides: Any) -> FieldInfo:
    """The declaration (default, bounds, description) of one `EngineConfig` field, for `Settings` to reuse;
    `overrides` replace attributes of it (a service default that differs from the library's)."""
    field = copy.copy(EngineConfig.__pydantic_fields__[name])
    for attribute, value in overrides.items():
        setattr(field, attribute, value)
    return field


def engine_config_from(values: object) -> EngineConfig:
    """An `EngineConfig` from the same-named attributes of `values` (a `Settings`)."""
    return EngineConfig(
        **{name: getattr(values, name) for name in EngineConfig.__pydantic_fields__ if hasattr(values, name)}
    )
