"""Tool-call formats: how a model writes its calls, read from its text. Each reader is a pure function of the text
so far and returns a `Snapshot` (the plain content that is safe to show, and the calls as far as they are
written); a snapshot of a longer text only ever extends the snapshot of a shorter one. Streaming sends the
difference between two snapshots (api/tools/streaming.py); the final answer is the snapshot of the whole text
(`parse_tool_calls`), so streamed deltas always reassemble to the non-streamed result.

Formats (pick one per model with api/tools/templates.py):
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated; text before the first call is
  content, text between or after calls is dropped, as vLLM does (Qwen2.5, Hermes 2/3 and many fine-tunes).
- llama3_json: the whole answer is `{"name": ..., "parameters": {...}}`, several separated by `;`, optionally after
  `<|python_tag|>` (Llama 3.1/3.2/3.3 with JSON-based tool calling).
- mistral: content, then `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral 7B v0.3, Nemo, Small).
- generic: for templates without tool support (like llama.cpp's generic format), the answer is JSON forced by a
  grammar (api/tools/definitions.py): `{"tool_calls": [...]}`, `{"tool_call": {...}}` or `{"response": "..."}`
  (a JSON value instead of the string when the client asked for JSON output).

To add a format: write a reader here (text -> Snapshot, using partial_json), add it to READERS, and teach
templates.detect_format to recognise the templates that use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from api.tools.partial_json import (
    Malformed,
    array_items,
    object_members,
    partial_string,
    skip_ws,
)


class ToolFormat(StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    MISTRAL = "mistral"
    GENERIC = "generic"


@dataclass(frozen=True, slots=True)
class CallSnapshot:
    name: str | None  # None until the name string is complete
    arguments: str  # the arguments' JSON text so far (grows by appending)
    complete: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    content: str  # plain text safe to show so far (grows by appending)
    calls: tuple[CallSnapshot, ...] = ()
    complete: bool = True  # the text ends where a finished answer may end
    malformed: bool = False  # the text cannot be this format; callers treat it all as content


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's `function.arguments`


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TAG = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")


def _without_partial_tag(text: str, tag: str) -> str:
    """Hold back an end of the text that may be the start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return text[:-length]
    return text


def read_call(text: str, start: int) -> tuple[CallSnapshot, int | None]:
    """The call object at `text[start]` (`{"name": ..., "arguments"|"parameters": ...}`) and the index after it."""
    members, end = object_members(text, start)
    name: str | None = None
    arguments, arguments_done = "", False
    for member in members:
        if member.key == "name" and member.end is not None:
            if text[member.start] != '"':
                raise Malformed("a tool call's name must be a string")
            name = partial_string(text, member.start, member.end)
        elif member.key in ARGUMENT_KEYS:
            if text[member.start] == '"':  # arguments written as a JSON string: shown once complete
                arguments = partial_string(text, member.start, member.end) if member.end is not None else ""
            else:
                arguments = text[member.start : member.end] if member.end is not None else text[member.start :]
            arguments_done = member.end is not None
    if end is not None and not arguments_done:
        arguments, arguments_done = arguments or "{}", True  # a call without arguments
    return CallSnapshot(name, arguments, end is not None and name is not None and arguments_done), end


def read_hermes(text: str) -> Snapshot:
    first = text.find(HERMES_OPEN)
    if first < 0:
        return Snapshot(_without_partial_tag(text, HERMES_OPEN))
    calls: list[CallSnapshot] = []
    position: int | None = first
    while position is not None and position >= 0:
        j = skip_ws(text, position + len(HERMES_OPEN))
        if j >= len(text):
            return Snapshot(text[:first], tuple(calls), complete=False)
        if text[j] != "{":
            raise Malformed(f"expected a call object after {HERMES_OPEN}")
        call, end = read_call(text, j)
        if end is None:
            return Snapshot(text[:first], (*calls, call), complete=False)
        k = skip_ws(text, end)
        closed = text.startswith(HERMES_CLOSE, k)
        if not closed and not HERMES_CLOSE.startswith(text[k:]):
            raise Malformed(f"expected {HERMES_CLOSE}")
        calls.append(CallSnapshot(call.name, call.arguments, call.complete and closed))
        if not closed:
            return Snapshot(text[:first], tuple(calls), complete=False)
        position = text.find(HERMES_OPEN, k + len(HERMES_CLOSE))
    return Snapshot(text[:first], tuple(calls))


def _read_call_list(text: str, j: int, separator: str) -> tuple[list[CallSnapshot], bool]:
    """Call objects from `text[j]` on, separated by `separator` (';' for Llama 3); (calls, complete)."""
    calls: list[CallSnapshot] = []
    while True:
        if text[j] != "{":
            raise Malformed("expected a call object")
        call, end = read_call(text, j)
        calls.append(call)
        if end is None:
            return calls, False
        j = skip_ws(text, end)
        if j >= len(text):
            return calls, all(c.complete for c in calls)
        if text[j] != separator:
            raise Malformed(f"unexpected {text[j]!r} after a call")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return calls, False


def read_llama3_json(text: str) -> Snapshot:
    j = skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, j):
        j = skip_ws(text, j + len(PYTHON_TAG))
    elif PYTHON_TAG.startswith(text[j:]) and j < len(text):
        return Snapshot("", complete=False)  # maybe the tag
    if j >= len(text):
        return Snapshot("", complete=not text.strip())  # nothing but whitespace yet: undecided
    if text[j] != "{":
        return Snapshot(text)  # a plain answer
    calls, complete = _read_call_list(text, j, ";")
    return Snapshot("", tuple(calls), complete=complete)


def read_mistral(text: str) -> Snapshot:
    tag = text.find(MISTRAL_TAG)
    if tag < 0:
        return Snapshot(_without_partial_tag(text, MISTRAL_TAG))
    j = skip_ws(text, tag + len(MISTRAL_TAG))
    if j >= len(text):
        return Snapshot(text[:tag], complete=False)
    items, end = array_items(text, j)
    calls = []
    for start, _ in items:
        if start >= len(text) or text[start] != "{":
            raise Malformed("expected a call object in the [TOOL_CALLS] list")
        calls.append(read_call(text, start)[0])
    return Snapshot(text[:tag], tuple(calls), complete=end is not None and all(c.complete for c in calls))


def read_generic(text: str) -> Snapshot:
    j = skip_ws(text, 0)
    if j >= len(text):
        return Snapshot("", complete=False)
    members, end = object_members(text, j)
    if not members:
        if end is not None:
            raise Malformed("the generic answer must not be empty")
        return Snapshot("", complete=False)
    if len(members) > 1:
        raise Malformed("the generic answer has exactly one key")
    member = members[0]
    if member.start >= len(text):
        return Snapshot("", complete=False)
    if member.key == "response":
        if text[member.start] == '"':
            return Snapshot(partial_string(text, member.start, member.end), complete=end is not None)
        # A JSON answer (the client's output schema, definitions.py): its own text is the content. Trailing
        # whitespace waits until more of the value follows, so what was streamed stays a prefix of the answer.
        value = text[member.start : member.end] if member.end is not None else text[member.start :].rstrip()
        return Snapshot(value, complete=end is not None)
    if member.key == "tool_call":
        call, _ = read_call(text, member.start)
        return Snapshot("", (call,), complete=end is not None and call.complete)
    if member.key == "tool_calls":
        items, _ = array_items(text, member.start)
        calls = [read_call(text, start)[0] for start, _ in items]
        return Snapshot("", tuple(calls), complete=end is not None and all(c.complete for c in calls))
    raise Malformed(f"unexpected key {member.key!r}")


READERS: dict[ToolFormat, Callable[[str], Snapshot]] = {
    ToolFormat.HERMES: read_hermes,
    ToolFormat.LLAMA3_JSON: read_llama3_json,
    ToolFormat.MISTRAL: read_mistral,
    ToolFormat.GENERIC: read_generic,
}


def snapshot(text: str, tool_format: ToolFormat) -> Snapshot:
    try:
        return READERS[tool_format](text)
    except (Malformed, ValueError):
        return Snapshot("", complete=False, malformed=True)


def parse_tool_calls(text: str, tool_format: ToolFormat) -> ParsedOutput:
    """The final reading of a whole answer. Text that is not a complete, well-formed answer of the format (a call
    cut off by max_tokens, broken JSON) comes back as plain content, with no calls."""
    snap = snapshot(text, tool_format)
    if snap.malformed or not snap.complete or any(call.name is None for call in snap.calls):
        return ParsedOutput(content=text or None)
    calls = tuple(ToolCall(call.name, call.arguments) for call in snap.calls if call.name is not None)
    content = snap.content.strip() if calls else snap.content
    return ParsedOutput(content=content or None, tool_calls=calls)
