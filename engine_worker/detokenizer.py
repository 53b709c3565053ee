"""Incremental detokenization with stop strings (SGLang `DecodeStatus` / vLLM offsets).

Text is decoded from a short window of context: `decode(ids[surr:])` minus `decode(ids[surr:read])`, which keeps
leading-space and merge behaviour of the tokenizer right without decoding the whole sequence each step. A
delta that ends in U+FFFD (a UTF-8 character split across tokens) is held back until the character completes.

Streaming emits text and token ids *together*: only tokens whose text is safe to send (complete characters,
and not possibly the start of a stop string) are released, with exactly their text. So the token ids a client
has received always correspond to the text it has received, which is what `resume_token_ids` relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How many tokens before the first new one are decoded as context (vLLM uses the same number).
CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class Emission:
    """What may be released to the client now: text and the tokens it belongs to."""

    text: str
    num_tokens: int


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    ids: list[int]  # context (prompt + resumed) followed by generated tokens
    skip_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    text: str = ""  # text of the generated tokens (truncated at a stop string once one matched)
    num_new: int = 0  # generated tokens seen
    _surr: int = 0
    _read: int = 0
    _boundaries: list[tuple[int, int]] = field(default_factory=list)  # (tokens, chars) where both align
    _sent_tokens: int = 0
    _sent_chars: int = 0

    def __post_init__(self) -> None:
        self._read = len(self.ids)
        self._surr = max(0, self._read - CONTEXT_TOKENS)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int, *, check_stop: bool = True, decode: bool = True) -> str | None:
        """Add one generated token; returns the stop string it completed, if any. `decode=False` counts the
        token without adding its text (a stop token that is not included in the output)."""
        self.ids.append(token_id)
        self.num_new += 1
        if not decode:
            self._boundaries.append((self.num_new, len(self.text)))
            return None
        surr_text = self._decode(self.ids[self._surr : self._read])
        new_text = self._decode(self.ids[self._surr :])
        if len(new_text) <= len(surr_text) or new_text.endswith(REPLACEMENT_CHAR):
            return None  # incomplete character (or no text yet): wait for the next token
        previous_len = len(self.text)
        self.text += new_text[len(surr_text) :]
        self._surr, self._read = self._read, len(self.ids)
        self._boundaries.append((self.num_new, len(self.text)))
        return self._find_stop(previous_len) if check_stop else None

    def _find_stop(self, previous_len: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(0, previous_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[: at + len(stop) if self.include_stop_str_in_output else at]
        return stop

    def _held_back_chars(self) -> int:
        """Length of the longest suffix of the text that could still grow into a stop string."""
        for length in range(min(self._max_stop_len - 1, len(self.text)), 0, -1):
            suffix = self.text[-length:]
            if any(stop.startswith(suffix) for stop in self.stop):
                return length
        return 0

    def emit(self, finished: bool) -> Emission:
        """Release what is safe: everything when finished, else up to the last aligned token boundary."""
        if finished:
            tokens, chars = self.num_new, len(self.text)
        else:
            safe_chars = len(self.text) - self._held_back_chars()
            tokens, chars = self._sent_tokens, self._sent_chars
            for boundary_tokens, boundary_chars in self._boundaries:
                if boundary_chars > safe_chars:
                    break
                tokens, chars = boundary_tokens, boundary_chars
        self._boundaries = [b for b in self._boundaries if b[0] > tokens]
        chars = max(chars, self._sent_chars)
        emission = Emission(text=self.text[self._sent_chars : chars], num_tokens=tokens - self._sent_tokens)
        self._sent_tokens, self._sent_chars = tokens, chars
        return emission
