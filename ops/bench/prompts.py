"""Deterministic prompts of an exact token length, shared by the server run and the baseline."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

# Ordinary BPE ids in common vocabularies: special and byte tokens sit below or far above this range.
TOKEN_ID_RANGE = (1000, 20000)

# Stand-in vocabulary when no tokenizer is at hand: roughly one token per word for BPE vocabularies.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
).split()


def prompt_token_ids(seed: int, index: int, length: int) -> list[int]:
    """The index-th prompt: a fresh stream per index, so prompts differ and no prefix is shared."""
    rng = random.Random(f"inferq-bench:{seed}:{index}")  # str seeds hash with sha512: stable across runs
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(length)]


def prompt_set(seed: int, count: int, length: int, *, first_index: int = 0) -> list[list[int]]:
    return [prompt_token_ids(seed, first_index + i, length) for i in range(count)]


def words_for(ids: list[int]) -> str:
    """An approximate text prompt: one common word per token id."""
    return " ".join(_WORDS[token % len(_WORDS)] for token in ids)


def local_decoder(tokenizer_dir: Path) -> Callable[[list[int]], str]:
    """Decode with a local HF tokenizer (imported lazily: transformers is heavy)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
