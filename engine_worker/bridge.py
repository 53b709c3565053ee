"""The worker's NATS side: pull requests (only as many as there are free slots), hand them to the engine
thread, publish its outputs as token events, answer cancels, heartbeat, and keep the registry entry fresh."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from nats.aio.client import Client as NatsClient
from opentelemetry.trace import Tracer

from broker import subjects
from broker.acks import confirmed_ack
from broker.affinity import SubjectTakeover
from broker.events import publish_event, subscribe_cancels
from broker.journal import latest_journaled_attempt
from broker.metrics import serve_metrics
from broker.registry import WorkerRegistry
from broker.results import result_finished
from broker.work_queue import Delivery, RequestIntake, give_back
from common.tasks import cancel_and_wait
from contracts import (
    Accepted,
    CancelRequest,
    Embeddings,
    EmbedRequest,
    End,
    ErrorCode,
    ErrorInfo,
    Failed,
    GenerateRequest,
    Heartbeat,
    Tokens,
    Usage,
    WorkerInfo,
)
from contracts.metrics import WorkerMetrics
from engine_worker.engine_loop import EngineLoop, StepEngine
from engine_worker.metrics import RequestTelemetry, WorkerTelemetry
from engine_worker.outputs import EmbedOutput, EngineStats, RequestOutput
from engine_worker.validation import error_code

log = structlog.get_logger(__name__)

_REMEMBERED_CANCELS = 10_000
_FETCH_TIMEOUT_S = 1.0
_HELD_PROGRESS_S = 10.0  # well inside the request queue's ack wait (30 s)
# After a NATS call failed (a frozen or dying node: timeouts, "no response from stream") the loops pause this
# long and go on: one failure must never end a loop, or the worker stays up but serves nothing again.
_NATS_RETRY_S = 0.5
_ANNOUNCE_TIMEOUT_S = 5.0
_REDELIVERY_CHECK_TIMEOUT_S = 3.0
_CHORES_AT_EXIT_S = 5.0  # acks and give-backs still running when the worker stops get this long to finish


@dataclass(slots=True)
class _InFlight:
    request: GenerateRequest | EmbedRequest
    # A fire-and-forget request's queue delivery, acked only once its result is stored: nobody else would
    # resume it, so if this worker dies first the queue hands it to another worker.
    held: Delivery | None = None
    seq: int = 0
    last_sent: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    telemetry: RequestTelemetry | None = None  # timings, trace parent and log context (engine_worker/metrics.py)

    @property
    def slots(self) -> int:
        return self.request.sampling.num_candidates if isinstance(self.request, GenerateRequest) else 1

    @property
    def engine_key(self) -> str:
        """Attempts of one request are distinct engine requests: a resubmission can land on this worker while
        a superseded attempt still runs here (e.g. after the worker was frozen)."""
        return engine_key(self.request)

    def event(self, event_type, **fields):
        self.seq += 1
        self.last_sent = time.monotonic()
        return event_type(request_id=self.request.request_id, attempt=self.request.attempt, seq=self.seq, **fields)


def engine_key(request: GenerateRequest | EmbedRequest) -> str:
    return request.request_id if request.attempt == 1 else f"{request.request_id}-a{request.attempt}"


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    capacity: int
    heartbeat_interval_s: float
    announce_interval_s: float
    drain_timeout_s: float = 30.0


class WorkerBridge:
    def __init__(
        self,
        nc: NatsClient,
        engine: StepEngine,
        intake: RequestIntake,
        registry: WorkerRegistry,
        info: WorkerInfo,
        config: BridgeConfig,
        validate: Callable[[GenerateRequest | EmbedRequest], None],
        tracer: Tracer | None = None,
        takeover: SubjectTakeover | None = None,
        compiled_decode_state: Callable[[], str | None] = lambda: None,
    ):
        self._nc = nc
        self._telemetry = WorkerTelemetry(info.worker_id, info.model, tracer)
        self._intake = intake
        self._registry = registry
        self._info = info
        self._config = config
        self._validate = validate
        self._takeover = takeover  # with affinity: pull what dead workers left on their own subjects
        self._compiled_decode_state = compiled_decode_state  # thread-safe: the warm-up ends on its own thread
        self._in_flight: dict[str, _InFlight] = {}  # by engine key (request id + attempt)
        self._current: dict[str, str] = {}  # request id -> engine key of its newest attempt here
        self._cancelled: OrderedDict[str, CancelRequest] = OrderedDict()  # cancels of requests not (yet) here
        self._outputs: asyncio.Queue[list[RequestOutput | EmbedOutput]] = asyncio.Queue()
        self._engine_stats: EngineStats | None = None  # the latest the engine thread handed over
        self._slot_freed = asyncio.Event()
        self._chores: set[asyncio.Task] = set()  # confirmed acks and give-backs, off the feeder's and pump's path
        self._dead: BaseException | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_loop = EngineLoop(
            engine, self._outputs_from_thread, self._rejected_from_thread, self._dead_from_thread
        )

    @property
    def worker_id(self) -> str:
        return self._info.worker_id

    # --- thread → loop hand-offs ------------------------------------------------------------------------
    def _outputs_from_thread(self, outputs: list[RequestOutput | EmbedOutput], stats: EngineStats | None) -> None:
        assert self._loop is not None
        if outputs:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, outputs)
        if stats is not None:
            self._loop.call_soon_threadsafe(self._set_engine_stats, stats)

    def _set_engine_stats(self, stats: EngineStats) -> None:
        self._engine_stats = stats

    def _rejected_from_thread(self, key: str, exc: Exception) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._fail(key, error_code(exc), str(exc)), self._loop)

    def _dead_from_thread(self, exc: BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._engine_died, exc)

    def _engine_died(self, exc: BaseException) -> None:
        self._dead = exc
        self._stop.set()

    # --- lifecycle --------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (then drain) or the engine dies (then fail what is in flight and raise)."""
        self._loop = asyncio.get_running_loop()
        self._engine_loop.start()
        await self._intake.start()
        cancels = await subscribe_cancels(self._nc, self._on_cancel)
        scrapes = await serve_metrics(self._nc, self.metrics_snapshot)
        await self._announce()
        tasks = [
            asyncio.create_task(self._feed(), name="feed"),
            asyncio.create_task(self._pump(), name="pump"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._keep_announced(), name="announce"),
        ]
        if self._takeover is not None:
            tasks.append(asyncio.create_task(self._take_over_orphans(self._takeover), name="takeover"))
        log.info("worker.ready", worker_id=self.worker_id, model=self._info.model, capacity=self._config.capacity)
        stop_waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([stop_waiter, asyncio.create_task(self._stop.wait())], return_when="FIRST_COMPLETED")
        stop_waiter.cancel()
        self._stop.set()  # the feeder stops pulling new work
        try:
            await asyncio.wait_for(self._registry.withdraw(self.worker_id), _ANNOUNCE_TIMEOUT_S)
        except Exception as exc:  # NATS failing: the entry expires with the bucket's TTL anyway
            log.warning("registry.withdraw_failed", error=repr(exc))
        await self._drain()
        await cancel_and_wait(*tasks)
        await cancels.unsubscribe()
        await scrapes.unsubscribe()
        await self._finish_chores()
        await self._intake.stop()
        self._engine_loop.stop()
        if self._dead is not None:
            raise RuntimeError("engine died") from self._dead

    def _chore(self, coro) -> None:
        """Run `coro` (an ack to confirm, a request to give back) beside the loops: NATS may take seconds to
        answer it in a node fault, and the feeder and the output pump must not wait for that."""
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _finish_chores(self) -> None:
        if self._chores:
            _, late = await asyncio.wait(set(self._chores), timeout=_CHORES_AT_EXIT_S)
            for task in late:
                task.cancel()

    async def _drain(self) -> None:
        if self._dead is not None:
            for key, flight in list(self._in_flight.items()):
                if flight.held is not None:
                    self._hand_back(flight)  # another worker's engine may well manage it
                else:
                    await self._fail(key, ErrorCode.INTERNAL, f"the engine failed: {self._dead}")
            return
        deadline = time.monotonic() + self._config.drain_timeout_s
        while self._in_flight and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout=0.5)
            except TimeoutError:
                pass
        for key, flight in list(self._in_flight.items()):
            if flight.held is not None:
                self._hand_back(flight)
            self._engine_loop.abort(key)  # what is left ends as "abort"; the edge resumes it elsewhere

    # --- intake -----------------------------------------------------------------------------------------
    def _free_slots(self) -> int:
        used = sum(flight.slots for flight in self._in_flight.values())
        return self._config.capacity - used

    async def _feed(self) -> None:
        while not self._stop.is_set():
            free = self._free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                deliveries = await self._intake.fetch(free, timeout=_FETCH_TIMEOUT_S)
            except Exception as exc:  # NATS reconnecting or a node frozen: pull again shortly
                log.warning("intake.fetch_failed", error=repr(exc))
                await asyncio.sleep(_NATS_RETRY_S)
                continue
            for delivery in deliveries:
                with self._telemetry.log_context(delivery.request, delivery.headers):
                    try:
                        await self._admit(delivery)
                    except Exception as exc:  # one bad message must not stop the intake of all others
                        log.exception("intake.admit_failed", request_id=delivery.request.request_id)
                        await self._refuse_unadmitted(delivery, exc)

    async def _refuse_unadmitted(self, delivery: Delivery, exc: Exception) -> None:
        """Tell the edge a request could not be admitted; NATS may be failing too (often why admitting failed),
        and that must not end the intake: an unanswered request is resubmitted by its edge or redelivered. A held
        request goes back to the queue instead: nobody would ever resubmit it (its publisher does not listen, and
        the refusal would most likely not be stored either), so terminating it lost it for good."""
        if subjects.is_durable_reply(delivery.request.reply_subject):
            self._chore(give_back(self._nc.jetstream(), delivery))
            return
        try:
            await delivery.msg.term()
            await self._reject(delivery.request, ErrorCode.INTERNAL, f"the worker could not admit it: {exc}")
        except Exception as refusal:
            log.warning("intake.refusal_failed", request_id=delivery.request.request_id, error=repr(refusal))

    async def _admit(self, delivery: Delivery) -> None:
        request = delivery.request
        durable = subjects.is_durable_reply(request.reply_subject)
        if durable:  # a redelivery starts over: its events must not mix with the dead attempt's
            request = request.model_copy(update={"attempt": delivery.held_attempt})
        cancelled = self._cancelled.get(request.request_id)
        if cancelled is not None and cancelled.covers(request.attempt):
            await delivery.msg.term()  # cancelled while queued: nobody wants the result
            return
        newer = self._newer_attempt_here(request)
        if newer is not None:
            # Safe to drop: the newer attempt came in a message of its own (a redelivery of one message is always
            # numbered past its earlier deliveries; an edge's resubmission or a give-back's copy is a new message),
            # which it holds or acked, so it is recovered without this one; and the edge and results readers only
            # follow the newest attempt. Running this one would abort the newer one and hand its reader an "abort"
            # (chaos seed 2026, 30 minutes: a direct publish's answer truncated after 18 tokens).
            log.warning("request.older_attempt_dropped", attempt=request.attempt, running=newer)
            self._chore(confirmed_ack(delivery.msg))
            return
        # A refusal is published before the message is removed: a held request's refusal that was not stored
        # must reach the queue again (_refuse_unadmitted), or its publisher never learns anything.
        if request.deadline is not None and time.time() > request.deadline:
            await self._reject(request, ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while it was queued")
            await delivery.msg.term()  # expired in the queue: drop it unprocessed
            return
        if delivery.num_delivered > 1 and await self._ran_already(request, durable):
            log.warning("request.redelivery_dropped", attempt=request.attempt, delivered=delivery.num_delivered)
            self._chore(confirmed_ack(delivery.msg))
            return
        engine_request = request.model_copy(update={"request_id": engine_key(request)})
        try:
            self._validate(engine_request)
        except ValueError as exc:  # validation.InvalidRequest, or a bad value the engine's checks ran into
            await self._reject(request, error_code(exc), str(exc))
            await delivery.msg.term()  # bad input never succeeds on any worker
            return
        # Requests with a live reply are acked on accept: the edge owns recovery, so a redelivery after a crash
        # would only replay tokens the client already has. The ack is confirmed (and repeated until it is): a
        # lost plain ack had JetStream hand the request out again after its ack wait, and it ran twice.
        if not durable:
            self._chore(confirmed_ack(delivery.msg))
        superseded = self._running(request.request_id)
        if superseded is not None:
            self._supersede(superseded, delivery)
        flight = _InFlight(
            request,
            held=delivery if durable else None,
            telemetry=self._telemetry.accepted(request, delivery.published_at, delivery.headers),
        )
        self._in_flight[flight.engine_key] = flight
        self._current[request.request_id] = flight.engine_key
        try:
            await publish_event(
                self._nc,
                request.reply_subject,
                Accepted(
                    request_id=request.request_id,
                    attempt=request.attempt,
                    seq=0,
                    worker_id=self.worker_id,
                    resumed_tokens=len(getattr(request, "resume_token_ids", ())),
                ),
            )
        except Exception:
            self._forget(flight)  # never reached the engine: its slot must not stay taken
            raise
        log.debug("request.accepted")
        if isinstance(engine_request, EmbedRequest):
            self._engine_loop.embed(engine_request)
        else:
            self._engine_loop.submit(engine_request)

    def _running(self, request_id: str) -> _InFlight | None:
        """The newest attempt of this request running here, if any."""
        key = self._current.get(request_id)
        return self._in_flight.get(key) if key is not None else None

    def _newer_attempt_here(self, request: GenerateRequest | EmbedRequest) -> int | None:
        """The attempt of this request running here, if it is newer than `request`'s."""
        flight = self._running(request.request_id)
        if flight is not None and flight.request.attempt > request.attempt:
            return flight.request.attempt
        return None

    def _supersede(self, older: _InFlight, delivery: Delivery) -> None:
        """A newer attempt of a request running here replaces it: the older attempt stops (its edge and the
        results readers ignore it) and never acks its message."""
        self._engine_loop.abort(older.engine_key)
        held, older.held = older.held, None
        if held is not None and held.msg.metadata.sequence.stream != delivery.msg.metadata.sequence.stream:
            # Another message (the original of a given-back copy): the newer attempt holds its own, so this one is
            # done; left unacked it would only be redelivered, and dropped, after the ack wait.
            self._chore(confirmed_ack(held.msg))

    async def _ran_already(self, request: GenerateRequest | EmbedRequest, durable: bool) -> bool:
        """Whether a redelivered request was in fact taken by a worker that then lost its ack (or whose ack was
        not confirmed within the ack wait), so running it again would generate it twice. A held request: its
        stored result is finished. A live one: the attempt runs here, or the journal holds events of it or of a
        newer attempt. When NATS cannot say, it runs (a worker that died before acking left it to this delivery:
        for a direct publisher, the only recovery there is)."""
        if engine_key(request) in self._in_flight:
            return True
        js = self._nc.jetstream()
        try:
            if durable:
                finished = await asyncio.wait_for(
                    result_finished(js, request.reply_subject), _REDELIVERY_CHECK_TIMEOUT_S
                )
                return finished is True
            latest = await asyncio.wait_for(
                latest_journaled_attempt(js, request.reply_subject), _REDELIVERY_CHECK_TIMEOUT_S
            )
        except TimeoutError:
            return False
        return latest is not None and latest >= request.attempt

    async def _reject(self, request: GenerateRequest | EmbedRequest, code: ErrorCode, message: str) -> None:
        error = ErrorInfo(code=code, message=message)
        await publish_event(
            self._nc,
            request.reply_subject,
            Failed(request_id=request.request_id, attempt=request.attempt, seq=1, error=error),
        )

    # --- outputs ----------------------------------------------------------------------------------------
    async def _pump(self) -> None:
        while True:
            for output in await self._outputs.get():
                with self._request_context(output.request_id):
                    try:
                        await self._emit(output)
                    except Exception as exc:
                        await self._emit_failed(output.request_id, exc)

    async def _emit_failed(self, key: str, exc: Exception) -> None:
        """An event NATS did not take (a durable one not stored in time, a full reconnect buffer): its request's
        answer has a hole, so it stops here. A held request goes back to the queue (redelivered as a new attempt,
        whose events replace these); a live one's edge notices the silence and resumes it elsewhere."""
        log.warning("request.publish_failed", error=repr(exc))
        flight = self._in_flight.get(key)
        if flight is None:
            return  # its last events failed: _finish gave a held request back
        self._engine_loop.abort(key)
        if flight.held is not None:
            self._hand_back(flight)
        else:
            self._forget(flight)

    def _request_context(self, key: str) -> contextlib.AbstractContextManager:
        """Log lines about a running request carry its request_id, model, worker_id and trace_id."""
        flight = self._in_flight.get(key)
        return flight.telemetry.log_context() if flight and flight.telemetry else contextlib.nullcontext()

    async def _emit(self, output: RequestOutput | EmbedOutput) -> None:
        flight = self._in_flight.get(output.request_id)
        if flight is None:
            return
        reply = flight.request.reply_subject
        if isinstance(output, EmbedOutput):
            await self._finish(
                flight, flight.event(Embeddings, vectors=output.vectors), flight.event(End, usage=output.usage)
            )
            if flight.telemetry:
                self._telemetry.finished(flight.telemetry, output.usage)
            return
        if output.choices or output.prompt_logprobs:
            await publish_event(
                self._nc, reply, flight.event(Tokens, choices=output.choices, prompt_logprobs=output.prompt_logprobs)
            )
        if flight.telemetry:
            self._telemetry.output(flight.telemetry, output)
        if output.finished:
            await self._finish(flight, flight.event(End, usage=output.usage or Usage()))
            if flight.telemetry:
                self._telemetry.finished(flight.telemetry, output.usage or Usage())

    async def _finish(self, flight: _InFlight, *events: Embeddings | End) -> None:
        """A request's last events; its slot is free from here on. A held request's message is acked once they
        are stored, or given back when NATS did not take them (it then runs again, as a newer attempt)."""
        self._forget(flight)
        try:
            for event in events:
                await publish_event(self._nc, flight.request.reply_subject, event)
        except Exception:
            if flight.held is not None:
                self._chore(give_back(self._nc.jetstream(), flight.held))
            raise
        self._release(flight)

    def _forget(self, flight: _InFlight) -> None:
        del self._in_flight[flight.engine_key]
        if self._current.get(flight.request.request_id) == flight.engine_key:
            del self._current[flight.request.request_id]
        self._slot_freed.set()

    async def _fail(self, key: str, code: ErrorCode, message: str) -> None:
        flight = self._in_flight.get(key)
        if flight is None:
            return
        self._forget(flight)
        await publish_event(
            self._nc, flight.request.reply_subject, flight.event(Failed, error=ErrorInfo(code=code, message=message))
        )
        if flight.telemetry:
            with flight.telemetry.log_context():
                self._telemetry.failed(flight.telemetry, message)
        self._release(flight)

    def _release(self, flight: _InFlight) -> None:
        """The result is stored: the held queue message is done. Confirmed: a lost ack would have the request
        redelivered and generated again."""
        if flight.held is not None:
            self._chore(confirmed_ack(flight.held.msg))

    def _hand_back(self, flight: _InFlight) -> None:
        """Give an unfinished fire-and-forget request back to the queue for another worker, at once."""
        self._forget(flight)
        self._chore(give_back(self._nc.jetstream(), flight.held))

    # --- cancels, heartbeats, registry ------------------------------------------------------------------
    async def _on_cancel(self, cancel: CancelRequest) -> None:
        flight = self._running(cancel.request_id)
        if flight is not None and cancel.covers(flight.request.attempt):
            self._engine_loop.abort(flight.engine_key)
            with self._request_context(flight.engine_key):
                log.info("request.cancelled", request_id=cancel.request_id, reason=cancel.reason)
        elif flight is None:
            self._cancelled[cancel.request_id] = cancel
            while len(self._cancelled) > _REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)

    async def _heartbeat(self) -> None:
        interval = self._config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for flight in list(self._in_flight.values()):
                try:
                    await self._beat(flight, now, interval)
                except Exception as exc:  # NATS failing: the next beat tries again
                    log.warning("heartbeat.failed", request_id=flight.request.request_id, error=repr(exc))

    async def _beat(self, flight: _InFlight, now: float, interval: float) -> None:
        if flight.held is not None:  # nobody listens live; the queue must not think this worker dead
            if now - flight.last_progress >= _HELD_PROGRESS_S:
                flight.last_progress = now
                await flight.held.msg.in_progress()
        elif now - flight.last_sent >= interval:
            await publish_event(self._nc, flight.request.reply_subject, flight.event(Heartbeat))

    def metrics_snapshot(self) -> WorkerMetrics:
        """This worker's answer to a fleet scrape (broker/metrics.py): the engine's latest stats, handed over by
        the engine thread. An engine that keeps none (the sim) is described by what the bridge sees: a request
        is running once its first token came out."""
        stats = self._engine_stats
        if stats is None:
            started = sum(
                1
                for flight in self._in_flight.values()
                if flight.telemetry and flight.telemetry.timeline.first_token_mono is not None
            )
            stats = EngineStats(running=started, waiting=len(self._in_flight) - started)
        return self._telemetry.snapshot(stats)

    async def _announce(self) -> None:
        running = sum(flight.slots for flight in self._in_flight.values())
        self._info = self._info.model_copy(
            update={"running": running, "updated_at": time.time(), "compiled_decode": self._compiled_decode_state()}
        )
        await self._registry.announce(self._info)

    async def _keep_announced(self) -> None:
        while True:
            await asyncio.sleep(self._config.announce_interval_s)
            try:
                await asyncio.wait_for(self._announce(), _ANNOUNCE_TIMEOUT_S)
            except Exception as exc:  # NATS reconnecting: the next beat retries
                log.warning("registry.announce_failed", error=str(exc))

    async def _take_over_orphans(self, takeover: SubjectTakeover) -> None:
        """As often as the registry entry is renewed: a worker that missed two renewals counts as gone, so its
        subject is taken over about half a registry TTL after its last heartbeat. One wrongly counted gone (a slow
        renewal, a skewed clock) only gets a second puller on its subject, which hands each request to one."""
        interval = self._config.announce_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                fresh_since = time.time() - 2 * interval
                workers = await self._registry.live_workers()
                live = [worker.worker_id for worker in workers if worker.updated_at >= fresh_since]
                await takeover.scan(live)
            except Exception as exc:  # NATS failing over, the registry unreadable: the next round tries again
                log.warning("takeover.scan_failed", error=repr(exc))
