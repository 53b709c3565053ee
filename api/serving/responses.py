"""`/v1/responses`: create (plain, streamed, in the background), retrieve, list input items, delete, cancel,
and follow a background response's stream from any replica. Responses are stored in NATS with their owner
(broker/response_store.py); another owner's id gets the same 404 as an unknown one."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing

import structlog
from fastapi.responses import StreamingResponse
from starlette.requests import Request

from api.auth.caller import Caller, get_caller
from api.engine_client import Generation
from api.errors import ApiError, as_api_error
from api.schemas.responses import ResponseRequest
from api.services import Services
from api.serving.chat import render_chat
from api.serving.generation import build_requests, new_id, until_disconnected
from api.serving.reattach import NEW, start
from api.serving.response_events import TERMINAL, Event, ResponseEvents, new_response
from api.serving.response_items import chat_messages, item_id, normalise_input
from broker.response_store import ResponseStore
from contracts import ErrorCode
from contracts.responses import StoredResponse

log = structlog.get_logger(__name__)
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")  # what item_id("resp") makes; anything else cannot exist
CANCEL_POLL_S = 0.5  # how often a background run looks for a cancel (which any replica may record)


def _store(services: Services) -> ResponseStore:
    if services.responses is None:
        raise ApiError(ErrorCode.UNAVAILABLE, "response storage is not available")
    return services.responses


async def owned_response(services: Services, caller: Caller, response_id: str) -> StoredResponse:
    """The stored response, if `caller` may see it; otherwise the not-found error (unknown or not theirs)."""
    found = await _store(services).get(response_id) if RESPONSE_ID.fullmatch(response_id) else None
    if found is None or not caller.can_see(found.record.owner):
        raise ApiError(ErrorCode.NOT_FOUND, f"response {response_id} does not exist", param="response_id")
    return found.record


async def create_response(body: ResponseRequest, services: Services, http: Request):
    caller = get_caller(http)
    history: list[dict] = []
    if body.previous_response_id:
        previous = await owned_response(services, caller, body.previous_response_id)
        if previous.status not in ("completed", "incomplete"):
            raise ApiError(ErrorCode.INVALID_REQUEST, f"previous response {previous.id} is {previous.status}; "
                           "only a finished response can be continued", param="previous_response_id")
        history = previous.conversation()
    items = normalise_input(body.input, history)
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompt = render_chat(chat_messages(body.instructions, [*history, *items]), tokenizer)
    response_id = item_id("resp")
    [request] = build_requests(services, model, [prompt], body.sampling(), new_id("resp"))
    record = StoredResponse(id=response_id, owner=caller.owner, input_items=items, history=history,
                            response=new_response(response_id, model.id, body.echoed(), status="queued"))
    if body.background:
        return await _start_background(services, record, request, stream=body.stream)
    [generation] = await start(services.engine, [request], NEW)
    events = _foreground(services, record, generation, store=body.store)
    if body.stream:
        return sse_events(events)
    return await until_disconnected(http, _last_response(events))


async def _foreground(services: Services, record: StoredResponse, generation: Generation, *,
                      store: bool) -> AsyncIterator[Event]:
    builder = ResponseEvents(record.response)
    builder.response["status"] = "in_progress"
    yield builder.lifecycle("response.created")
    async with aclosing(builder.run(generation)) as events:
        async for event in events:
            yield event
    if store:
        await _store(services).put(record.model_copy(update={"response": builder.response}))


async def _last_response(events: AsyncIterator[Event]) -> dict:
    response: dict = {}
    async for event in events:
        response = event.get("response", response)
    return response


async def _start_background(services: Services, record: StoredResponse, request, *, stream: bool):
    store = _store(services)
    await store.create(record.model_copy(update={"request": request.model_dump(mode="json")}))
    builder = ResponseEvents(record.response)
    await store.publish_event(record.id, builder.lifecycle("response.created"))
    snapshot = copy.deepcopy(record.response)  # the run changes record.response from now on
    services.response_runs.start(_run_background(services, record.id, request, builder))
    if stream:
        return sse_events(follow_events(services, record.id, after=-1))
    return snapshot


async def _run_background(services: Services, response_id: str, request, builder: ResponseEvents) -> None:
    """Run the generation, logging each event and saving the response at every lifecycle step; stops early
    when a cancel is recorded (by any replica)."""
    store = _store(services)
    try:
        [generation] = await start(services.engine, [request], NEW)
        events = builder.run(generation)
    except Exception as exc:  # queueing failed: the response fails, nobody is waiting on an HTTP status
        events = _one(builder.failed(as_api_error(exc)))
    watcher = asyncio.create_task(_cancel_requested(store, response_id))
    try:
        async with aclosing(events):
            async for event in _until(watcher, events):
                await store.publish_event(response_id, event)
                if "response" in event:
                    await _save(store, response_id, builder.response)
        if watcher.done() and watcher.result():
            await store.publish_event(response_id, builder.cancelled())
            await _save(store, response_id, builder.response)
    except Exception:
        log.exception("responses.background_failed", response_id=response_id)
    finally:
        watcher.cancel()


async def _one(event: Event) -> AsyncIterator[Event]:
    yield event


async def _until(watcher: asyncio.Task, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`events` until `watcher` finishes (a cancel), whichever comes first."""
    while True:
        step = asyncio.ensure_future(anext(events))
        await asyncio.wait([step, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


async def _cancel_requested(store: ResponseStore, response_id: str) -> bool:
    while True:
        await asyncio.sleep(CANCEL_POLL_S)
        found = await store.get(response_id)
        if found is None or found.record.cancel_requested:
            return True


async def _save(store: ResponseStore, response_id: str, response: dict) -> None:
    """Write the runner's view of the response, unless a cancel has been recorded meanwhile (it stands)."""
    def edit(record: StoredResponse) -> StoredResponse | None:
        if record.status == "cancelled" and response.get("status") != "cancelled":
            return None
        return record.model_copy(update={"response": response})

    await store.change(response_id, edit)


async def cancel_response(services: Services, caller: Caller, response_id: str) -> dict:
    record = await owned_response(services, caller, response_id)
    if not record.response.get("background"):
        raise ApiError(ErrorCode.INVALID_REQUEST, "only a background response can be cancelled",
                       param="response_id")

    def edit(current: StoredResponse) -> StoredResponse | None:
        if current.status in ("completed", "incomplete", "failed", "cancelled"):
            return None  # finished: cancelling changes nothing (as OpenAI answers)
        return current.model_copy(update={"cancel_requested": True,
                                          "response": {**current.response, "status": "cancelled"}})

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
        raise ApiError(ErrorCode.INVALID_REQUEST, "only a background response can be streamed again",
                       param="stream")
    return sse_events(follow_events(services, response_id, after))


def sse_events(events: AsyncIterator[Event]) -> StreamingResponse:
    """Named SSE events (`event: <type>`), as OpenAI frames the Responses stream (no `[DONE]`)."""
    async def frames() -> AsyncIterator[str]:
        async with aclosing(events):
            async for event in events:
                yield f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def input_items_page(record: StoredResponse, *, order: str, after: str | None, limit: int) -> dict:
    items = record.input_items if order == "asc" else list(reversed(record.input_items))
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


async def delete_response(services: Services, caller: Caller, response_id: str) -> dict:
    await owned_response(services, caller, response_id)
    await _store(services).delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
