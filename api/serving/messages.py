"""`POST /v1/messages` (Anthropic Messages): the conversation → the model's chat template → the same queue
request, reattach and metering path as chat completions → Anthropic's message shape or its named stream events.
Tools go through the same tool plan as chat (api/tools/plan.py): it renders them, constrains the answer when a
call is forced, and reads the answer into text and calls, which become `text` and `tool_use` blocks here.
`POST /v1/messages/count_tokens`: the prompt's length, nothing generated."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from api.affinity import client_key, conversation_key
from api.auth.caller import get_caller
from api.catalog import ServedModel
from api.engine_client import Generation, merge
from api.errors import ApiError, anthropic_error_body, status_for
from api.schemas.anthropic import MessagesInput, MessagesRequest
from api.services import Services
from api.serving.chat import render_chat
from api.serving.completion_parts import ChoiceState, build_requests, collect, until_disconnected
from api.serving.reattach import reattach_from, start
from api.streaming import primed
from api.tools.plan import ToolPlan, plan_tools, tool_finish_reason
from api.tools.streaming import StreamDelta
from contracts import ErrorCode

ID_PREFIX = "msg"


# Anthropic's SDK (its tool runner, `client.beta.messages.thread()`) asks the server to hold the conversation
# (`thread`); this answer, with its machine-readable details, makes it go on without a thread, sending the whole
# conversation each turn.
def threads_unsupported() -> ApiError:
    return ApiError(
        ErrorCode.INVALID_REQUEST,
        "thread: server-held conversation threads are not supported by this server; send the whole conversation",
        param="thread",
        details={"error_code": "thread_unsupported_request", "unsupported": ["thread"]},
    )


async def count_tokens(body: MessagesInput, services: Services) -> dict:
    model = await services.catalog.get(body.model)
    prompt, _ = await _prompt(body, services, model)
    return {"input_tokens": len(prompt)}


async def _prompt(body: MessagesInput, services: Services, model: ServedModel) -> tuple[list[int], ToolPlan]:
    tokenizer = await services.catalog.tokenizer(model)
    tools = plan_tools(
        body.function_tools,
        body.function_tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        chat_template=getattr(tokenizer, "chat_template", None),
    )
    prompt = render_chat(body.chat_messages(), tokenizer, continue_final_message=body.prefilled, tools=tools)
    return prompt, tools


async def create_message(body: MessagesRequest, services: Services, http: Request):
    if body.thread is not None:
        raise threads_unsupported()
    model = await services.catalog.get(body.model)
    prompt, tools = await _prompt(body, services, model)
    await tools.check(services.structured_validation)  # the tools' input schemas (and the call envelope) compile
    # Idempotency-Key / X-Request-Id attach to the caller's own earlier request, exactly as on chat completions.
    reattach = reattach_from(http.headers, ID_PREFIX, get_caller(http).owner)
    request_id = reattach.response_id(ID_PREFIX)
    [request] = build_requests(services, model, [prompt], body.sampling(), request_id, constraint=tools.constraint)
    engine = services.engine.routed_by(routing_key(body))
    [generation] = await start(engine, [request], reattach)  # reserves the caller's token budget
    reply = _Reply(message_id(request_id), model.id, len(prompt), tools, request_id)
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


def routing_key(body: MessagesRequest) -> str:
    """What the message's generation is routed by (api/affinity.py): `metadata.user_id` (Anthropic's end-user
    id), else the conversation's opening (the system prompt and the first user message), which every later turn
    of the conversation repeats."""
    user = body.metadata.user_id if body.metadata else None
    return conversation_key(body.chat_messages(), client_key(user=user))


def message_id(request_id: str) -> str:
    """Anthropic's `msg_…` form of our request id (`msg-<hex>`)."""
    return f"{ID_PREFIX}_{request_id.rpartition('-')[2]}"


def stop_fields(finish_reason: str | None, stop_reason: str | int | None) -> dict:
    """Anthropic's stop_reason (and the stop sequence that matched, if one did)."""
    if finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if finish_reason == "tool_calls":
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if isinstance(stop_reason, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_reason}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def tool_use_id(call_id: str) -> str:
    """Anthropic's `toolu_…` form of the plan's deterministic call id (`call_…`)."""
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict:
    """A call's arguments as the `input` object. A forced call's are always an object (the grammar's doing); a
    model's own format may write something else, which is then no input rather than a broken block."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class _Reply:
    def __init__(self, message_id: str, model: str, input_tokens: int, tools: ToolPlan, request_id: str):
        self.id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.cached_tokens = 0  # of the prompt, read from the worker's prefix cache (known at the end)
        self.tools = tools
        self.request_id = request_id

    def _message(self, content: list[dict], stop: dict, output_tokens: int) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            **stop,
            "usage": {**self._input_usage(), "output_tokens": output_tokens},
        }

    def _input_usage(self) -> dict[str, int]:
        """Anthropic counts cache reads apart: `input_tokens` are the prompt tokens computed afresh."""
        return {
            "input_tokens": self.input_tokens - self.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached_tokens,
        }

    async def collect(self, generation: Generation) -> dict:
        collected = await collect([generation], 1)
        state = collected.choices.get(0) or ChoiceState(0)
        usage = collected.usages[0]
        self.input_tokens, self.cached_tokens = usage.prompt_tokens, usage.cached_tokens
        reply = self.tools.reply("".join(state.text), self.request_id, 0, state.finish_reason)
        content = [{"type": "text", "text": reply.content or ""}] if reply.content or not reply.tool_calls else []
        content += [
            {
                "type": "tool_use",
                "id": tool_use_id(call["id"]),
                "name": call["function"]["name"],
                "input": tool_input(call["function"]["arguments"]),
            }
            for call in reply.tool_calls
        ]
        return self._message(content, stop_fields(reply.finish_reason, state.stop_reason), usage.completion_tokens)

    async def events(self, generation: Generation) -> AsyncIterator[dict]:
        """message_start, ping, the content blocks (start, deltas, stop: text_delta for text, input_json_delta for
        a tool_use's input), message_delta (stop reason and usage), message_stop: the order Anthropic's SDK
        accumulates a message from. A plain answer's text block opens at once, as Anthropic's do."""
        reader = self.tools.stream(self.request_id)
        blocks = _Blocks()
        started, text = False, ""
        finish_reason: str | None = None
        stop_reason: str | int | None = None
        output_tokens = 0
        async for _, event in merge([generation]):
            if not started:
                started = True
                yield {
                    "type": "message_start",
                    "message": self._message([], {"stop_reason": None, "stop_sequence": None}, 0),
                }
                if reader is None:
                    for block_event in blocks.open_text():
                        yield block_event
                yield {"type": "ping"}
            if event.kind == "end":
                output_tokens = event.usage.completion_tokens
                self.input_tokens, self.cached_tokens = event.usage.prompt_tokens, event.usage.cached_tokens
                continue
            for delta in event.choices:
                text += delta.text
                for block_event in blocks.add(reader.feed(text) if reader else StreamDelta(delta.text)):
                    yield block_event
                if delta.finish_reason is not None:
                    finish_reason, stop_reason = delta.finish_reason.value, delta.stop_reason
        if reader is not None:
            for block_event in blocks.add(reader.finish(text)):
                yield block_event
            finish_reason = tool_finish_reason(finish_reason, bool(reader.calls))
        for block_event in blocks.close():
            yield block_event
        yield {
            "type": "message_delta",
            "delta": stop_fields(finish_reason, stop_reason),
            "usage": {**self._input_usage(), "output_tokens": output_tokens},  # cumulative, as Anthropic's are
        }
        yield {"type": "message_stop"}


class _Blocks:
    """The content blocks of a streamed message, one open at a time, numbered in order: text opens a text block
    (unless one is open), each call a tool_use block whose input arrives as JSON fragments."""

    def __init__(self) -> None:
        self._count = 0
        self._open: str | None = None  # the open block's type
        self._call_blocks: dict[int, int] = {}  # call index -> block index

    def _start(self, block: dict) -> Iterator[dict]:
        yield from self._stop()
        self._open = block["type"]
        self._count += 1
        yield {"type": "content_block_start", "index": self._count - 1, "content_block": block}

    def open_text(self) -> Iterator[dict]:
        yield from self._start({"type": "text", "text": ""})

    def add(self, delta: StreamDelta) -> Iterator[dict]:
        if delta.content:
            if self._open != "text":
                yield from self.open_text()
            yield {
                "type": "content_block_delta",
                "index": self._count - 1,
                "delta": {"type": "text_delta", "text": delta.content},
            }
        for entry in delta.tool_calls:
            if "id" in entry:
                block = {
                    "type": "tool_use",
                    "id": tool_use_id(entry["id"]),
                    "name": entry["function"]["name"],
                    "input": {},
                }
                yield from self._start(block)
                self._call_blocks[entry["index"]] = self._count - 1
            if fragment := entry["function"].get("arguments"):
                yield {
                    "type": "content_block_delta",
                    "index": self._call_blocks[entry["index"]],
                    "delta": {"type": "input_json_delta", "partial_json": fragment},
                }

    def close(self) -> Iterator[dict]:
        """Stop the open block; a message that had none gets its (empty) text block."""
        if self._count == 0:
            yield from self.open_text()
        yield from self._stop()

    def _stop(self) -> Iterator[dict]:
        if self._open is not None:
            self._open = None
            yield {"type": "content_block_stop", "index": self._count - 1}


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
