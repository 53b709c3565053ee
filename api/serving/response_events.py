"""One response's life as the Responses API's named stream events, each with its `sequence_number`, and the
Response object they carry. A foreground stream sends them as they come; a background response logs them (any
replica replays them); a non-streaming request keeps only the last one's response."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from typing import Any

from api.engine_client import Generation, merge
from api.errors import ApiError
from contracts import Usage

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
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


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

    async def run(self, generation: Generation) -> AsyncIterator[Event]:
        """The events from `response.in_progress` to the terminal one, following the generation. A failure
        of the generation ends them with `response.failed` (the stream has started: no HTTP status left)."""
        self.response["status"] = "in_progress"
        yield self.lifecycle("response.in_progress")
        # Named after the response: a runner that takes a background response over makes the same events.
        message_id = "msg_" + self.response["id"].removeprefix("resp_")
        message = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
        self.response["output"].append(message)
        yield self.event("response.output_item.added", output_index=0, item=copy.deepcopy(message))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        message["content"].append(part)
        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        yield self.event("response.content_part.added", **where, part=copy.deepcopy(part))
        finish_reason, usage = None, Usage()
        try:
            async for _, update in merge([generation]):
                if update.kind == "end":
                    usage = update.usage
                    continue
                for delta in update.choices:
                    if delta.text:
                        part["text"] += delta.text
                        yield self.event("response.output_text.delta", **where, delta=delta.text, logprobs=[])
                    if delta.finish_reason is not None:
                        finish_reason = delta.finish_reason.value
        except ApiError as exc:
            yield self.failed(exc)
            return
        incomplete = finish_reason == "length"
        message["status"] = "incomplete" if incomplete else "completed"
        yield self.event("response.output_text.done", **where, text=part["text"], logprobs=[])
        yield self.event("response.content_part.done", **where, part=copy.deepcopy(part))
        yield self.event("response.output_item.done", output_index=0, item=copy.deepcopy(message))
        self.response["usage"] = usage_body(usage)
        if incomplete:
            self.response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
            yield self.lifecycle("response.incomplete")
        else:
            self.response["status"] = "completed"
            yield self.lifecycle("response.completed")
