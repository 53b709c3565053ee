"""Background responses, run durably: the accepting replica stores the response (with its queue request) and
queues a ticket; a runner on any replica pulls it, runs the generation, logs each event and saves the response
at each lifecycle step. A runner heartbeats its ticket and acks it only once the response is final, so if its
replica dies the ticket goes to another runner after the ack wait, which picks the generation up from the
token journal (or queues it again) and logs only the events after the last one logged: nothing repeated, nothing
lost. Interactive priority: background responses are not batch lines and wait behind nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import structlog
from nats.aio.msg import Msg

from api.auth.metering import Meter
from api.errors import as_api_error
from api.job_tickets import heartbeat_interval, keep_alive, pull_tickets
from api.services import Services
from api.serving.reattach import Reattach, start
from api.serving.response_events import TERMINAL, Event, ResponseEvents, answer_reader
from api.serving.responses import routing_key
from broker.errors import BrokerError
from broker.response_store import ResponseStore
from common.tasks import cancel_and_wait
from contracts import GenerateRequest
from contracts.responses import StoredResponse

log = structlog.get_logger(__name__)
# How often a run looks for a cancel (which any replica may record): one KV get per running background response
# each time; a small model writes ~100 tokens in the gap on a fast CPU.
CANCEL_POLL_S = 0.25
FINISHED = ("completed", "incomplete", "failed", "cancelled")
_MAX_RUNS = 64  # background responses one replica runs at once; the rest wait in the queue for any replica
_MISSING_DELIVERIES = 5  # a ticket whose record is still missing after this many tries names nothing (dropped)


MeterForOwner = Callable[[str], Awaitable[Meter | None]]


class ResponseRunner:
    """`meter_for_owner` (api/auth): each response's tokens count against its owner's budget (charge-only, as
    batch lines: it was accepted already)."""

    def __init__(self, services: Services, store: ResponseStore, meter_for_owner: MeterForOwner | None = None):
        self._services = services
        self._store = store
        self._meter_for_owner = meter_for_owner
        self.runner_id = f"r{uuid.uuid4().hex[:12]}"
        self._heartbeat_s = heartbeat_interval(store.queue)
        self._runs: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._serve(), name="response-runner")

    async def stop(self) -> None:
        """Stop pulling; responses still running are handed back (nak), so another replica takes them at once."""
        await cancel_and_wait(self._loop, *self._runs)
        await self._store.queue.stop()

    async def _serve(self) -> None:
        await pull_tickets(self._store.queue, self._handle, self._runs, _MAX_RUNS, "response_runner")

    async def _handle(self, msg: Msg) -> None:
        response_id = msg.data.decode(errors="replace")
        heartbeat = asyncio.create_task(keep_alive(msg, self._heartbeat_s, "response_runner"))
        try:
            stored = await run_background(self._services, self._store, response_id, self._meter_for_owner)
        except asyncio.CancelledError:
            await asyncio.shield(_quietly(msg.nak()))
            raise
        except Exception:
            log.exception("response.run_failed", response_id=response_id)
            await _quietly(msg.nak(delay=1.0))
            return
        finally:
            heartbeat.cancel()
        if not stored and msg.metadata.num_delivered < _MISSING_DELIVERIES:
            # The ticket is queued before the record is written: the record may be on its way.
            await _quietly(msg.nak(delay=1.0))
            return
        await _quietly(msg.ack())


async def run_background(
    services: Services, store: ResponseStore, response_id: str, meter_for_owner: MeterForOwner | None = None
) -> bool:
    """Run (or take over) one background response to its final state. False if there is no such record (not
    yet written, or deleted)."""
    found = await store.get(response_id)
    if found is None:
        return False
    if found.record.request is None:
        return True  # not a background response: nothing to run
    logged = await store.logged(response_id)
    if logged is None:  # the accepting replica died before logging the first event: log it now
        created = ResponseEvents(found.record.response).lifecycle("response.created")
        await store.publish_event(response_id, created)
        logged = created, created
    created, last = logged
    builder = ResponseEvents(created["response"], after=created["sequence_number"])
    if found.record.status in FINISHED:
        if last["type"] not in TERMINAL:  # cancelled before any runner ran it: its stream still needs an end
            builder = ResponseEvents(found.record.response, after=last["sequence_number"])
            await store.publish_event(response_id, builder.cancelled())
        return True
    last_logged = last["sequence_number"]
    request = GenerateRequest.model_validate(found.record.request).model_copy(
        update={
            # This replica's reply subject, and a fresh queue deadline: the first runner may be long gone.
            "reply_subject": services.engine.reply_subject(found.record.request["request_id"]),
            "deadline": time.time() + services.settings.queue_timeout_s,
        }
    )
    try:
        meter = await meter_for_owner(found.record.owner) if meter_for_owner else None
        # Attach to the generation if the journal has it (a runner before this one started it), else submit.
        engine = services.engine.charging(meter).routed_by(routing_key(found.record))
        [generation] = await start(engine, [request], Reattach(request_id=request.request_id))
        events = builder.run(generation, answer_reader(found.record, request.request_id))
    except Exception as exc:  # queueing failed: the response fails (nobody waits on an HTTP status)
        events = _one(builder.failed(as_api_error(exc)))
    watcher = asyncio.create_task(_cancel_requested(store, response_id))
    try:
        async with aclosing(events):
            async for event in _until(watcher, events):
                if event["sequence_number"] <= last_logged:
                    continue  # logged by the runner before this one (the same event: the same tokens)
                await store.publish_event(response_id, event)
                if "response" in event:
                    await _save(store, response_id, builder.response)
        if watcher.done() and watcher.result():
            await store.publish_event(response_id, builder.cancelled())
            await _save(store, response_id, builder.response)
    finally:
        watcher.cancel()
    return True


async def _one(event: Event) -> AsyncIterator[Event]:
    yield event


async def _until(watcher: asyncio.Task, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`events` until `watcher` finishes (a cancel), whichever comes first."""
    while True:
        step = asyncio.ensure_future(anext(events))
        await asyncio.wait([step, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            await cancel_and_wait(step)
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


async def _cancel_requested(store: ResponseStore, response_id: str) -> bool:
    while True:
        await asyncio.sleep(CANCEL_POLL_S)
        try:
            found = await store.get(response_id)
        except BrokerError:
            continue
        if found is None or found.record.cancel_requested:
            return True


async def _save(store: ResponseStore, response_id: str, response: dict) -> None:
    """Write the runner's view of the response, unless a cancel has been recorded meanwhile (it stands)."""

    def edit(record: StoredResponse) -> StoredResponse | None:
        if record.status == "cancelled" and response.get("status") != "cancelled":
            return None
        return record.model_copy(update={"response": response})

    await store.change(response_id, edit)


async def _quietly(action) -> None:
    try:
        await action
    except Exception as exc:  # a missed beat only risks a takeover, which the event log makes safe
        log.warning("response_runner.ticket_reply_failed", error=str(exc))
