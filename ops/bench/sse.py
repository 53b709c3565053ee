"""A small incremental server-sent-events decoder (the WHATWG event-stream rules the benchmark needs:
data/event fields, comments, multi-line data, CRLF/CR/LF line ends split anywhere across network reads)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Only these three end a line in SSE; str.splitlines would also split on U+2028 etc. inside JSON text.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEDecoder:
    """Feed decoded text as it arrives; get back the events completed by it."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""

    def feed(self, text: str) -> list[SSEEvent]:
        self._buffer += text
        events: list[SSEEvent] = []
        start = 0
        for match in _LINE_END.finditer(self._buffer):
            # A CR at the very end may be the first half of a CRLF still in flight.
            if match.group() == "\r" and match.end() == len(self._buffer):
                break
            event = self._line(self._buffer[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self._buffer = self._buffer[start:]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id and retry do not matter to a benchmark

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        return SSEEvent(data="\n".join(data), event=event) if data else None
