"""`/v1/responses`: create (plain, streamed, in the background), retrieve, list input items, delete, cancel,
and follow a background response's stream from any replica. Responses are stored in NATS with their owner
(broker/response_store.py); another owner's id gets the same 404 as an unknown one."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from api.affinity import client_key, conversation_key
from api.auth.caller import Caller, get_caller
from api.engine_client import Generation
from api.errors import ApiError
from api.schemas.responses import ResponseRequest
from api.services import Services
from api.serving.chat import render_chat
from api.serving.completion_parts import build_requests, new_id, until_disconnected
from api.serving.reattach import NEW, start
from api.serving.response_events import TERMINAL, Event, ResponseEvents, answer_reader, new_response
from api.serving.response_items import chat_messages, item_id, normalise_input
from api.tools.plan import plan_tools
from api.tools.streaming import ToolCallStream
from broker.response_store import ResponseStore
from contracts import ErrorCode, GenerateRequest
from contracts.responses import StoredResponse

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")  # what item_id("resp") makes; anything else cannot exist


def _store(services: Services) -> ResponseStore:
    if services.responses is None:
        raise ApiError(ErrorCode.UNAVAILABLE, "response storage is not available")
    return services.responses


async def owned_response(services: Services, caller: Caller, response_id: str) -> StoredResponse:
    """The stored response, if `caller` may see it; otherwise the not-found error (unknown, expired or not
    theirs)."""
    store = _store(services)
    found = await store.get(response_id) if RESPONSE_ID.fullmatch(response_id) else None
    if found is None or store.expired(found.record) or not caller.can_see(found.record.owner):
        raise ApiError(ErrorCode.NOT_FOUND, f"response {response_id} does not exist", param="response_id")
    return found.record


async def create_response(body: ResponseRequest, services: Services, http: Request):
    caller = get_caller(http)
    history: list[dict] = []
    if body.previous_response_id:
        previous = await owned_response(services, caller, body.previous_response_id)
        if previous.status not in ("completed", "incomplete"):
            raise ApiError(
                ErrorCode.INVALID_REQUEST,
                f"previous response {previous.id} is {previous.status}; only a finished response can be continued",
                param="previous_response_id",
            )
        history = previous.conversation()
    items = normalise_input(body.input, history)
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    tools = plan_tools(
        body.function_tools,
        body.function_tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        chat_template=getattr(tokenizer, "chat_template", None),
        response_constraint=body.constraint,
        response_param="text.format",
    )
    prompt = render_chat(chat_messages(body.instructions, [*history, *items]), tokenizer, tools=tools)
    # The tools' schemas and the constraint (the tools' own or text.format) compile:
    await tools.check(services.structured_validation)
    response_id = item_id("resp")
    sampling = body.sampling()
    if body.background and sampling.seed is None:
        # A runner that takes over may have to generate again: the same seed gives the same tokens.
        sampling = sampling.model_copy(update={"seed": int(response_id[-8:], 16)})
    [request] = build_requests(services, model, [prompt], sampling, new_id("resp"), constraint=tools.constraint)
    record = StoredResponse(
        id=response_id,
        owner=caller.owner,
        input_items=items,
        history=history,
        response=new_response(response_id, model.id, body.echoed(), status="queued"),
        tool_answer_format=tools.answer_format.value if tools.answer_format else None,
    )
    if body.background:
        return await _start_background(services, record, request, stream=body.stream)
    [generation] = await start(services.engine.routed_by(routing_key(record)), [request], NEW)
    events = _foreground(services, record, generation, answer_reader(record, request.request_id), store=body.store)
    if body.stream:
        return sse_events(events)
    return await until_disconnected(http, _last_response(events))


def routing_key(record: StoredResponse) -> str:
    """What the response's generation is routed by (api/affinity.py): the client's key (`prompt_cache_key`, else
    `user` or `safety_identifier`), else the opening of the conversation it continues. For a previous_response_id
    chain that is the rebuilt conversation, so every turn of the chain (and a client that sends the whole
    conversation each turn instead) keys the same. Read from the record alone, so that whichever replica runs a
    background response routes it as the accepting one would."""
    response = record.response
    explicit = client_key(response.get("prompt_cache_key"), response.get("user") or response.get("safety_identifier"))
    conversation = chat_messages(response.get("instructions"), [*record.history, *record.input_items])
    return conversation_key(conversation, explicit)


async def _foreground(
    services: Services, record: StoredResponse, generation: Generation, reader: ToolCallStream | None, *, store: bool
) -> AsyncIterator[Event]:
    builder = ResponseEvents(record.response)
    builder.response["status"] = "in_progress"
    yield builder.lifecycle("response.created")
    async with aclosing(builder.run(generation, reader)) as events:
        async for event in events:
            yield event
    if store:
        await _store(services).put(record.model_copy(update={"response": builder.response}))


async def _last_response(events: AsyncIterator[Event]) -> dict:
    response: dict = {}
    async for event in events:
        response = event.get("response", response)
    return response


async def _start_background(services: Services, record: StoredResponse, request: GenerateRequest, *, stream: bool):
    """Queue it for any replica's runner, store the response with its queue request, log its first event. The
    ticket comes first: if this replica dies after storing, the response still runs (a runner retries a ticket
    whose record is not there yet, and logs the first event itself if it is missing)."""
    store = _store(services)
    await store.queue.publish(record.id)
    await store.create(record.model_copy(update={"request": request.model_dump(mode="json")}))
    await store.publish_event(record.id, ResponseEvents(record.response).lifecycle("response.created"))
    if stream:
        return sse_events(follow_events(services, record.id, after=-1))
    return record.response


async def cancel_response(services: Services, caller: Caller, response_id: str) -> dict:
    record = await owned_response(services, caller, response_id)
    if not record.response.get("background"):
        raise ApiError(ErrorCode.INVALID_REQUEST, "only a background response can be cancelled", param="response_id")

    def edit(current: StoredResponse) -> StoredResponse | None:
        if current.status in ("completed", "incomplete", "failed", "cancelled"):
            return None  # finished: cancelling changes nothing (as OpenAI answers)
        return current.model_copy(
            update={"cancel_requested": True, "response": {**current.response, "status": "cancelled"}}
        )

    changed = await _store(services).change(response_id, edit)
    return (changed.record if changed else record).response


async def follow_events(services: Services, response_id: str, after: int) -> AsyncIterator[Event]:
    """A background response's events after sequence number `after`: the logged ones, then live ones, up to
    the terminal event."""
    async with aclosing(_store(services).events(response_id)) as events:
        async for event in events:
            if event["sequence_number"] > after:
                yield event
            if event["type"] in TERMINAL:
                return


async def stream_stored(services: Services, caller: Caller, response_id: str, after: int) -> StreamingResponse:
    record = await owned_response(services, caller, response_id)
    if not record.response.get("background"):
        raise ApiError(ErrorCode.INVALID_REQUEST, "only a background response can be streamed again", param="stream")
    return sse_events(follow_events(services, response_id, after))


def sse_events(events: AsyncIterator[Event]) -> StreamingResponse:
    """Named SSE events (`event: <type>`), as OpenAI frames the Responses stream (no `[DONE]`)."""

    async def frames() -> AsyncIterator[str]:
        async with aclosing(events):
            async for event in events:
                yield f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def input_items_page(record: StoredResponse, *, order: str, after: str | None, limit: int) -> dict:
    items = record.input_items if order == "asc" else list(reversed(record.input_items))
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


async def delete_response(services: Services, caller: Caller, response_id: str) -> dict:
    await owned_response(services, caller, response_id)
    await _store(services).delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
