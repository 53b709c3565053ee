"""Anthropic's SSE framing: a named event per chunk, and a failure after the headers as an `error` event."""

from __future__ import annotations

import json

from api.errors import ApiError
from api.serving.messages import message_id, named_sse, stop_fields
from contracts import ErrorCode


async def test_named_events_then_an_error_event_in_anthropics_shape() -> None:
    async def events():
        yield {"type": "message_start", "message": {}}
        raise ApiError(ErrorCode.WORKER_LOST, "the worker died")

    frames = [frame async for frame in named_sse(events())]
    assert frames[0] == 'event: message_start\ndata: {"type":"message_start","message":{}}\n\n'
    name, data = frames[1].removesuffix("\n\n").split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the worker died"},
    }


def test_stop_reasons_and_ids() -> None:
    assert stop_fields("length", None) == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert stop_fields("stop", "\n\n") == {"stop_reason": "stop_sequence", "stop_sequence": "\n\n"}
    assert stop_fields("stop", 2) == {"stop_reason": "end_turn", "stop_sequence": None}  # the EOS token
    assert message_id("msg-0123abcd") == "msg_0123abcd"
