"""OpenAI streaming deltas for tool calls, from a growing text. `ToolCallStream.feed(text)` takes the whole text
so far (not a fragment) and returns what is new since the previous call: plain content, and tool-call deltas in
OpenAI's shape: the first delta of a call carries index, id, type and name (and whatever arguments are already
known, so a call that arrives in one piece is one delta); later deltas carry argument fragments.

Everything is a function of the text: call ids derive from (request id, call index), so a resumed or replayed
stream produces the same ids, and the concatenated fragments equal the final `parse_tool_calls` arguments.

`finish(text)` ends the stream (it releases what was held back); `content` and `calls` are what the deltas sent
so far add up to, so a non-streamed answer is built by feeding the whole text once and finishing: the
non-streamed message is then the streamed one reassembled, by construction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from api.tools.formats import Snapshot, ToolFormat, snapshot


def tool_call_id(request_id: str, index: int) -> str:
    """Deterministic: the same request and call index always give the same id (OpenAI ids look like call_...)."""
    return "call_" + hashlib.sha256(f"{request_id}\x00{index}".encode()).hexdigest()[:24]


@dataclass(slots=True)
class StreamDelta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI `delta.tool_calls` entries

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class ToolCallStream:
    """One choice's stream. Once the text turns out not to be this format (malformed), the rest goes out as
    content: what was held back is released, calls already announced stay as they were sent. (The generic format
    is forced by a grammar, so its text is never malformed; its content is the decoded `response` string.)"""

    def __init__(self, request_id: str, tool_format: ToolFormat, *, max_calls: int | None = None) -> None:
        self.request_id = request_id
        self.format = tool_format
        self.max_calls = max_calls  # parallel_tool_calls=false: later calls are not sent
        self.content = ""  # all content sent so far
        self.calls: list[dict[str, Any]] = []  # the calls sent so far, in `message.tool_calls` shape
        self._sent = Snapshot("", complete=False)
        self._announced = 0  # calls whose first delta went out
        self._sent_text = 0  # plain-text mode (malformed): characters of the raw text sent as content
        self._raw = False

    def feed(self, text: str) -> StreamDelta:
        return self._record(self._feed(text))

    def finish(self, text: str) -> StreamDelta:
        """The last delta, for the whole text. A model's own format that ended without a single call was plain
        text after all: what was held back (a possible tag, a possible call) goes out as content, so the content
        is the whole text, as `parse_tool_calls` reads it."""
        if not self._raw and not self._announced and self.format is not ToolFormat.GENERIC:
            self._to_raw()
        return self.feed(text)

    def _to_raw(self) -> None:
        self._raw = True
        # The content already sent is a prefix of the text (every format's content is); the rest follows.
        self._sent_text = len(self._sent.content)

    def _record(self, delta: StreamDelta) -> StreamDelta:
        self.content += delta.content
        for entry in delta.tool_calls:
            if "id" in entry:
                self.calls.append({"id": entry["id"], "type": "function", "function": dict(entry["function"])})
            else:
                self.calls[entry["index"]]["function"]["arguments"] += entry["function"]["arguments"]
        return delta

    def _feed(self, text: str) -> StreamDelta:
        if self._raw:
            return self._feed_raw(text)
        current = snapshot(text, self.format)
        if current.malformed:
            self._to_raw()
            return self._feed_raw(text)
        delta = StreamDelta(content=current.content[len(self._sent.content) :])
        for index, call in enumerate(current.calls[: self.max_calls]):
            if call.name is None:
                break  # calls go out in order; a later one waits for this one's name
            sent_arguments = self._sent.calls[index].arguments if index < self._announced else None
            if sent_arguments is None:
                delta.tool_calls.append(
                    {
                        "index": index,
                        "id": tool_call_id(self.request_id, index),
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                )
                self._announced = index + 1
            elif len(call.arguments) > len(sent_arguments):
                delta.tool_calls.append(
                    {"index": index, "function": {"arguments": call.arguments[len(sent_arguments) :]}}
                )
        self._sent = Snapshot(current.content, current.calls[: self._announced], current.complete)
        return delta

    def _feed_raw(self, text: str) -> StreamDelta:
        delta = StreamDelta(content=text[self._sent_text :])
        self._sent_text = len(text)
        return delta
