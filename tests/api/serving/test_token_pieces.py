"""`split_into_tokens` with the real SmolLM2 (byte-level BPE) tokenizer: pieces are text, join to the text, and a
character split across tokens lands whole on the token that completes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.serving.token_pieces import split_into_tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path):
    from api.tokenizer_loading import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_dir)  # the api's own (api/fast_tokenizer.py)


def test_pieces_are_decoded_text_one_per_token(tokenizer) -> None:
    text = " Paris is the capital.\nNext line"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = split_into_tokens(tokenizer, ids, text)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert " Paris" in pieces and "\n" in "".join(pieces[3:]) and not any("Ġ" in p or "Ċ" in p for p in pieces)


def test_a_character_split_across_tokens_goes_to_the_token_completing_it(tokenizer) -> None:
    text = "ok 🦜 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["ok", "ĠðŁ", "¦", "ľ", "Ġdone"]  # the parrot: 3 byte tokens
    assert split_into_tokens(tokenizer, ids, text) == ["ok", "", "", " 🦜", " done"]


def test_context_and_a_truncated_text(tokenizer) -> None:
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    ids = tokenizer.encode(" hello world STOP more", add_special_tokens=False)
    # The engine cut the text at a stop string: the tokens from there on have empty pieces.
    pieces = split_into_tokens(tokenizer, ids, " hello world", context=prompt)
    assert "".join(pieces) == " hello world" and len(pieces) == len(ids) and pieces[-1] == ""
