"""`POST /v1/messages` (Anthropic Messages): the conversation → the model's chat template → the same queue
request, reattach and metering path as chat completions → Anthropic's message shape or its named stream events.
`POST /v1/messages/count_tokens`: the prompt's length, nothing generated."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from api.auth.caller import get_caller
from api.catalog import ServedModel
from api.engine_client import Generation, merge
from api.errors import ApiError, anthropic_error_body, status_for
from api.schemas.anthropic import MessagesInput, MessagesRequest
from api.services import Services
from api.serving.chat import render_chat
from api.serving.generation import ChoiceState, build_requests, collect, until_disconnected
from api.serving.reattach import reattach_from, start
from api.streaming import primed

ID_PREFIX = "msg"


async def count_tokens(body: MessagesInput, services: Services) -> dict:
    model = await services.catalog.get(body.model)
    return {"input_tokens": len(await _prompt(body, services, model))}


async def _prompt(body: MessagesInput, services: Services, model: ServedModel) -> list[int]:
    tokenizer = await services.catalog.tokenizer(model)
    return render_chat(body.chat_messages(), tokenizer, continue_final_message=body.prefilled)


async def create_message(body: MessagesRequest, services: Services, http: Request):
    model = await services.catalog.get(body.model)
    prompt = await _prompt(body, services, model)
    # Idempotency-Key / X-Request-Id attach to the caller's own earlier request, exactly as on chat completions.
    reattach = reattach_from(http.headers, ID_PREFIX, get_caller(http).owner)
    request_id = reattach.response_id(ID_PREFIX)
    [request] = build_requests(services, model, [prompt], body.sampling(), request_id)
    [generation] = await start(services.engine, [request], reattach)  # reserves the caller's token budget
    reply = _Reply(message_id(request_id), model.id, len(prompt))
    if body.stream:
        # The first event waits for the first output, so a failure before any (no worker, queue timeout) is a
        # real HTTP status in Anthropic's shape that its SDK retries on, not an error event inside a 200.
        events = await until_disconnected(http, primed(reply.events(generation)))
        return StreamingResponse(
            named_sse(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await until_disconnected(http, reply.collect(generation))


def message_id(request_id: str) -> str:
    """Anthropic's `msg_…` form of our request id (`msg-<hex>`)."""
    return f"{ID_PREFIX}_{request_id.rpartition('-')[2]}"


def stop_fields(finish_reason: str | None, stop_reason: str | int | None) -> dict:
    """Anthropic's stop_reason (and the stop sequence that matched, if one did)."""
    if finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if isinstance(stop_reason, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_reason}
    return {"stop_reason": "end_turn", "stop_sequence": None}


class _Reply:
    def __init__(self, message_id: str, model: str, input_tokens: int):
        self.id = message_id
        self.model = model
        self.input_tokens = input_tokens

    def _message(self, content: list[dict], stop: dict, output_tokens: int) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            **stop,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens},
        }

    async def collect(self, generation: Generation) -> dict:
        collected = await collect([generation], 1)
        state = collected.choices.get(0) or ChoiceState(0)
        usage = collected.usages[0]
        self.input_tokens = usage.prompt_tokens
        return self._message(
            [{"type": "text", "text": "".join(state.text)}],
            stop_fields(state.finish_reason, state.stop_reason),
            usage.completion_tokens,
        )

    async def events(self, generation: Generation) -> AsyncIterator[dict]:
        """message_start, content_block_start, ping, text deltas, content_block_stop, message_delta (stop reason
        and usage), message_stop: the order Anthropic's SDK accumulates a message from."""
        started = False
        stop = stop_fields(None, None)
        output_tokens = 0
        async for _, event in merge([generation]):
            if not started:
                started = True
                yield {
                    "type": "message_start",
                    "message": self._message([], {"stop_reason": None, "stop_sequence": None}, 0),
                }
                yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
                yield {"type": "ping"}
            if event.kind == "end":
                output_tokens = event.usage.completion_tokens
                continue
            for delta in event.choices:
                if delta.text:
                    yield {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": delta.text},
                    }
                if delta.finish_reason is not None:
                    stop = stop_fields(delta.finish_reason.value, delta.stop_reason)
        yield {"type": "content_block_stop", "index": 0}
        yield {"type": "message_delta", "delta": stop, "usage": {"output_tokens": output_tokens}}
        yield {"type": "message_stop"}


async def named_sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Anthropic's framing: `event: <type>` before each `data:` (its SDK dispatches on the event name), no
    `[DONE]`; a failure after the headers went out is an `error` event in its error shape."""
    try:
        async for event in events:
            yield _frame(event)
    except ApiError as exc:
        yield _frame(anthropic_error_body(status_for(exc), exc.info.message))


def _frame(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'), allow_nan=False)}\n\n"
