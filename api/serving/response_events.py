"""One response's life as the Responses API's named stream events, each with its `sequence_number`, and the
Response object they carry. A foreground stream sends them as they come; a background response logs them (any
replica replays them); a non-streaming request keeps only the last one's response."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from api.engine_client import Generation, merge
from api.errors import ApiError
from api.tools.formats import ToolFormat
from api.tools.plan import ToolPlan
from api.tools.streaming import StreamDelta, ToolCallStream
from contracts import Usage
from contracts.responses import StoredResponse

Event = dict[str, Any]
TERMINAL = ("response.completed", "response.incomplete", "response.failed", "response.cancelled")


def new_response(response_id: str, model: str, echoed: dict[str, Any], *, status: str) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        **echoed,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def answer_reader(record: StoredResponse, request_id: str) -> ToolCallStream | None:
    """The reader of the response's answer as its tool plan made it (None: plain text), rebuilt from the record
    so every runner reads the same calls with the same ids."""
    if record.tool_answer_format is None:
        return None
    plan = ToolPlan(
        ToolFormat.GENERIC,
        answer_format=ToolFormat(record.tool_answer_format),
        parallel_tool_calls=record.response.get("parallel_tool_calls", True) is not False,
    )
    return plan.stream(request_id)


class ResponseEvents:
    """Builds the events of one response in order; `response` is the object as of the last event."""

    def __init__(self, response: dict[str, Any], after: int = -1):
        self.response = response
        self._sequence = after

    def event(self, kind: str, **fields: Any) -> Event:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence, **fields}

    def lifecycle(self, kind: str) -> Event:
        return self.event(kind, response=copy.deepcopy(self.response))

    def failed(self, error: ApiError) -> Event:
        self.response.update(status="failed", error={"code": error.info.code.value, "message": error.info.message})
        return self.lifecycle("response.failed")

    def cancelled(self) -> Event:
        self.response.update(status="cancelled")
        return self.lifecycle("response.cancelled")

    async def run(self, generation: Generation, reader: ToolCallStream | None = None) -> AsyncIterator[Event]:
        """The events from `response.in_progress` to the terminal one, following the generation. `reader`: the
        tool plan's reader of the answer (api/tools/plan.py), which turns the text into content and function
        calls; None: the text is the answer. A failure of the generation ends the events with `response.failed`
        (the stream has started: no HTTP status left)."""
        self.response["status"] = "in_progress"
        yield self.lifecycle("response.in_progress")
        output = _OutputItems(self)
        if reader is None:
            for event in output.open_message():  # at once, as OpenAI's plain answers do
                yield event
        text, finish_reason, usage = "", None, Usage()
        try:
            async for _, update in merge([generation]):
                if update.kind == "end":
                    usage = update.usage
                    continue
                for delta in update.choices:
                    text += delta.text
                    if delta.finish_reason is not None:
                        finish_reason = delta.finish_reason.value
                    for event in output.add(reader.feed(text) if reader else StreamDelta(delta.text)):
                        yield event
        except ApiError as exc:
            yield self.failed(exc)
            return
        if reader is not None:
            for event in output.add(reader.finish(text)):
                yield event
        incomplete = finish_reason == "length"
        for event in output.close(incomplete):
            yield event
        self.response["usage"] = usage_body(usage)
        if incomplete:
            self.response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
            yield self.lifecycle("response.incomplete")
        else:
            self.response["status"] = "completed"
            yield self.lifecycle("response.completed")


class _OutputItems:
    """The response's output items as the answer arrives: one `message` (opened by the first content) and one
    `function_call` item per call, in the order they appear; every item is closed at the end. Ids are functions
    of the response and the call ids (themselves functions of the request), so a runner that takes a background
    response over makes the same events."""

    def __init__(self, events: ResponseEvents):
        self._events = events
        self._output: list[dict[str, Any]] = events.response["output"]
        self._message: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # call index -> its item

    def add(self, delta: StreamDelta) -> Iterator[Event]:
        yield from self.text(delta.content)
        for entry in delta.tool_calls:
            if "id" in entry:
                yield from self._open_call(entry)
            arguments = entry["function"].get("arguments") or ""
            if arguments:
                item = self._calls[entry["index"]]
                item["arguments"] += arguments
                yield self._events.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._output.index(item),
                    delta=arguments,
                )

    def text(self, piece: str) -> Iterator[Event]:
        if not piece:
            return
        if self._message is None:
            yield from self.open_message()
        assert self._message is not None
        self._message["content"][0]["text"] += piece
        yield self._events.event("response.output_text.delta", **self._where(), delta=piece, logprobs=[])

    def open_message(self) -> Iterator[Event]:
        message_id = "msg_" + self._events.response["id"].removeprefix("resp_")
        message = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
        self._message = message
        self._output.append(message)
        yield self._events.event(
            "response.output_item.added", output_index=len(self._output) - 1, item=copy.deepcopy(message)
        )
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        message["content"].append(part)
        yield self._events.event("response.content_part.added", **self._where(), part=copy.deepcopy(part))

    def _open_call(self, entry: dict[str, Any]) -> Iterator[Event]:
        item = {
            "type": "function_call",
            "id": "fc_" + entry["id"].removeprefix("call_"),
            "call_id": entry["id"],
            "name": entry["function"]["name"],
            "arguments": "",
            "status": "in_progress",
        }
        self._calls[entry["index"]] = item
        self._output.append(item)
        yield self._events.event(
            "response.output_item.added", output_index=len(self._output) - 1, item=copy.deepcopy(item)
        )

    def _where(self) -> dict[str, Any]:
        assert self._message is not None
        return {"item_id": self._message["id"], "output_index": self._output.index(self._message), "content_index": 0}

    def close(self, incomplete: bool) -> Iterator[Event]:
        """Done events for every item, in output order; an answer with neither text nor calls is an empty
        message."""
        if not self._output:
            yield from self.open_message()
        for index, item in enumerate(self._output):
            item["status"] = "incomplete" if incomplete else "completed"
            if item["type"] == "message":
                part = item["content"][0]
                yield self._events.event("response.output_text.done", **self._where(), text=part["text"], logprobs=[])
                yield self._events.event("response.content_part.done", **self._where(), part=copy.deepcopy(part))
            else:
                yield self._events.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            yield self._events.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))
