"""Incremental detokenization with the real SmolLM2 tokenizer: split UTF-8, stop strings, hold-back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine_worker.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str | None]:
    """Feed tokens one by one; returns the streamed deltas (the last at finish) and the stop matched."""
    deltas = []
    for token in ids:
        stop = detok.append(token)
        if stop is not None:
            deltas.append(detok.emit(finished=True).text)
            return deltas, stop
        deltas.append(detok.emit(finished=False).text)
    deltas.append(detok.emit(finished=True).text)
    return deltas, None


def test_split_multibyte_characters_are_never_emitted_partially(tokenizer) -> None:
    text = "I like 🍕 and 日本語 text"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji and CJK characters span several tokens
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, [1]), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert "" in deltas[:-1]  # some tokens had to wait for the rest of their character
    assert " 🍕" in deltas


def test_context_keeps_leading_spaces(tokenizer) -> None:
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(" hello there")
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, list(prompt)), ids)
    assert "".join(deltas) == " hello there"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, include) -> None:
    ids = tokenizer.encode("Hello world, stop here please")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=("op he",), include_stop_str_in_output=include)
    deltas, stop = stream(detok, ids)
    assert stop == "op he"
    assert "".join(deltas) == ("Hello world, stop he" if include else "Hello world, st")
    assert detok.num_new == ids.index(tokenizer.encode(" here")[0]) + 1  # ended on the completing token


def test_possible_stop_prefix_is_held_back_while_streaming(tokenizer) -> None:
    ids = tokenizer.encode("Hello world, wonderful")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=("world!", "xyz"))
    emitted = ""
    for token in ids[:2]:  # "Hello", " world"
        detok.append(token)
        emitted += detok.emit(finished=False).text
    assert emitted == "Hello"  # " world" could still become "world!"
    detok.append(ids[2])  # ","
    emitted += detok.emit(finished=False).text
    assert emitted == "Hello world,"
    for token in ids[3:]:
        assert detok.append(token) is None
        emitted += detok.emit(finished=False).text
    emitted += detok.emit(finished=True).text
    assert emitted == "Hello world, wonderful"


def test_emissions_carry_exactly_the_tokens_of_their_text(tokenizer) -> None:
    ids = tokenizer.encode("ab 🍕 stop-ish sto")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=("stop!",))
    sent_tokens, sent_text = 0, ""
    for token in ids:
        detok.append(token)
        emission = detok.emit(finished=False)
        sent_tokens += emission.num_tokens
        sent_text += emission.text
        assert tokenizer.decode(ids[:sent_tokens]) == sent_text
    final = detok.emit(finished=True)
    assert sent_tokens + final.num_tokens == len(ids) and sent_text + final.text == tokenizer.decode(ids)
    assert final.text == " sto"  # held back to the end: it might have become "stop!"


def test_special_tokens_follow_skip_special_tokens(tokenizer) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hi") + [im_end] + tokenizer.encode(" there")
    skipped, _ = stream(IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=True), ids)
    kept, _ = stream(IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=False), ids)
    assert "".join(skipped) == "Hi there"
    assert "".join(kept) == "Hi<|im_end|> there"


def test_a_token_counted_without_text(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=False)
    detok.append(tokenizer.encode("Hi")[0])
    detok.append(tokenizer.eos_token_id, decode=False)  # a stop token left out of the output
    final = detok.emit(finished=True)
    assert final.text == "Hi" and final.num_tokens == 2
