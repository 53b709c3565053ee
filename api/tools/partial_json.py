"""Just enough of a JSON scanner to read a document that is still being generated: where a value ends (or that it
has not ended yet), the members of an object and the items of an array read so far. Positions only; values are
sliced from the text by the callers, so a tool call's arguments are the model's own bytes, not a re-serialization.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = " \t\r\n"
_SCALAR_END = _WS + ",}]"
# Scanning runs on the whole text after every token of a stream, so it is left to the regex engine rather than a
# Python loop per character: the rest of a string after its opening quote (possessive, so an unclosed string fails
# without backtracking), and the next character that matters inside a container.
_STRING_REST = re.compile(r'(?:[^"\\]++|\\.)*+"', re.DOTALL)
_STRUCTURAL = re.compile(r'[{}\[\]"]')


class Malformed(ValueError):
    """The text cannot be the beginning of a JSON document of the expected shape."""


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """`text[i]` is the opening quote; the index after the closing quote, None if the string is not closed yet."""
    match = _STRING_REST.match(text, i + 1)
    return match.end() if match else None


def value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at `text[i]`; None while it is incomplete. A scalar that reaches
    the end of the text is incomplete (`12` may become `123`, `tru` becomes `true`)."""
    if i >= len(text):
        return None
    char = text[i]
    if char == '"':
        return string_end(text, i)
    if char in "{[":
        depth, j = 0, i
        while (found := _STRUCTURAL.search(text, j)) is not None:
            j, char = found.start(), found.group()
            if char == '"':
                end = string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            depth += 1 if char in "{[" else -1
            if depth == 0:
                return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in _SCALAR_END:
        j += 1
    if j == len(text):
        return None
    if j == i:
        raise Malformed(f"unexpected {text[i]!r} at {i}")
    return j


@dataclass(slots=True)
class Member:
    key: str
    start: int  # the value's first character
    end: int | None  # after its last; None while incomplete


def object_members(text: str, i: int) -> tuple[list[Member], int | None]:
    """Members of the object whose `{` is at `text[i]`, as far as they are readable, and the index after its `}`
    (None while open). A member appears once its key and colon are complete."""
    if i >= len(text) or text[i] != "{":
        raise Malformed(f"expected an object at {i}")
    members: list[Member] = []
    j = skip_ws(text, i + 1)
    if j < len(text) and text[j] == "}":
        return members, j + 1
    while j < len(text):
        if text[j] != '"':
            raise Malformed(f"expected a key at {j}")
        key_end = string_end(text, j)
        if key_end is None:
            return members, None
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text):
            return members, None
        if text[j] != ":":
            raise Malformed(f"expected ':' at {j}")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return members, None
        end = value_end(text, j)
        members.append(Member(key, j, end))
        j, closed = _after_item(text, end, "}")
        if j is None:
            return members, closed
    return members, None


def array_items(text: str, i: int) -> tuple[list[tuple[int, int | None]], int | None]:
    """(start, end) of the items of the array whose `[` is at `text[i]` as far as they are readable, and the index
    after its `]` (None while open)."""
    if i >= len(text) or text[i] != "[":
        raise Malformed(f"expected an array at {i}")
    items: list[tuple[int, int | None]] = []
    j = skip_ws(text, i + 1)
    if j < len(text) and text[j] == "]":
        return items, j + 1
    while j < len(text):
        end = value_end(text, j)
        items.append((j, end))
        j, closed = _after_item(text, end, "]")
        if j is None:
            return items, closed
    return items, None


def _after_item(text: str, end: int | None, closer: str) -> tuple[int | None, int | None]:
    """After a member or item that ends at `end`: (where the next one starts, None) after a comma, or
    (None, index after the closer) when the container closes, or (None, None) when the text ends first."""
    if end is None:
        return None, None
    j = skip_ws(text, end)
    if j >= len(text):
        return None, None
    if text[j] == closer:
        return None, j + 1
    if text[j] != ",":
        raise Malformed(f"expected ',' or {closer!r} at {j}")
    return skip_ws(text, j + 1), None


def partial_string(text: str, start: int, end: int | None) -> str:
    """The decoded characters of the JSON string at `text[start]` so far (all of it when `end` is known); an escape
    sequence cut off at the end of the text is held back."""
    if end is not None:
        return json.loads(text[start:end], strict=False)
    raw = text[start + 1 :]
    while raw:
        try:
            return json.loads('"' + raw + '"', strict=False)  # strict=False: raw control characters pass
        except json.JSONDecodeError:
            raw = raw[:-1]  # an unfinished escape (`\`, `\u00`): at most 5 characters are trimmed
    return ""
