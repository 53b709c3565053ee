"""A text split at its token boundaries: one piece per token id, the pieces joining to exactly the text. What
Aleph Alpha's `completion_tokens` is ("the completion split into tokens"); the vocabulary's own strings
(`ĠParis`, `Ċ`) are an encoding detail of byte-level tokenizers, not text.

Boundaries come from incremental decoding over a short window (as the engine decodes its output): a token whose
text is not complete yet (a UTF-8 character split across tokens decodes to U+FFFD) gets an empty piece and the
character goes to the token that completes it. The pieces are cut from `text` itself, so text the engine dropped
after the last token it sent (a stop string not included in the output) is dropped from the pieces too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONTEXT_TOKENS = 5  # tokens before the first one decoded as context (leading spaces, merges), as the engine does
_REPLACEMENT_CHAR = "\ufffd"


def split_into_tokens(
    tokenizer: Any, ids: Sequence[int], text: str, *, context: Sequence[int] = (), skip_special_tokens: bool = True
) -> list[str]:
    """`text` (what `ids` decode to after `context`) cut into one piece per id."""
    window = list(context[-CONTEXT_TOKENS:]) if context else []
    surr, read = 0, len(window)
    ends: list[int] = []  # where each token's text ends in `text`
    produced = 0
    for token in ids:
        window.append(token)
        before = tokenizer.decode(window[surr:read], skip_special_tokens=skip_special_tokens)
        after = tokenizer.decode(window[surr:], skip_special_tokens=skip_special_tokens)
        if len(after) > len(before) and not after.endswith(_REPLACEMENT_CHAR):
            produced += len(after) - len(before)
            surr, read = read, len(window)
        ends.append(produced)
    pieces, start = [], 0
    for end in ends:
        end = max(start, min(end, len(text)))
        pieces.append(text[start:end])
        start = end
    if pieces and start < len(text):  # whatever decoding left over belongs to the last token
        pieces[-1] += text[start:]
    return pieces
