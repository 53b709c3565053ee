"""Runs the synchronous engine on its own thread so the asyncio loop stays free for acks, heartbeats and
cancels (a blocked loop starves JetStream heartbeats). Commands go in through a thread-safe queue; outputs
and stats come back through callbacks the caller makes loop-safe. The engine thread owns every engine object:
the only things that cross are requests, ids, outputs and `EngineStats` snapshots (plain values)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from contracts import EmbedRequest, GenerateRequest
from engine_worker.outputs import EmbedOutput, EngineStats, RequestOutput

log = structlog.get_logger(__name__)

_IDLE_WAIT_S = 0.05
STATS_INTERVAL_S = 0.1  # stats go out at most this often while busy (and once when the engine turns idle)
RELEASE_MEMORY_AFTER_IDLE_S = 2.0  # an engine idle this long gives its KV pages back (engines that can)


class StepEngine(Protocol):
    def validate(self, request: GenerateRequest | EmbedRequest) -> None:
        """Raises `validation.InvalidRequest`; reads frozen limits only, so the bridge calls it on its thread."""
        ...

    def stats(self) -> EngineStats | None: ...
    def embed(self, requests: list[EmbedRequest]) -> list[EmbedOutput]: ...
    def add_request(self, request: GenerateRequest) -> None: ...
    def abort_request(self, request_id: str) -> None: ...
    def has_unfinished_requests(self) -> bool: ...
    def step(self) -> list[RequestOutput]: ...


class EngineLoop:
    def __init__(
        self,
        engine: StepEngine,
        on_outputs: Callable[[list[RequestOutput | EmbedOutput], EngineStats | None], None],
        on_rejected: Callable[[str, Exception], None],
        on_dead: Callable[[BaseException], None],
    ):
        self._engine = engine
        self._on_outputs = on_outputs
        self._on_rejected = on_rejected
        self._on_dead = on_dead
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._next_stats = 0.0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerateRequest) -> None:
        self._commands.put(("add", request))

    def embed(self, request: EmbedRequest) -> None:
        self._commands.put(("embed", request))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _apply(self, command: str, payload: object, embeds: list[EmbedRequest]) -> None:
        if command == "embed":
            assert isinstance(payload, EmbedRequest)
            embeds.append(payload)
        elif command == "add":
            assert isinstance(payload, GenerateRequest)
            try:
                self._engine.add_request(payload)
            except ValueError as exc:
                self._on_rejected(payload.request_id, exc)
        elif command == "abort":
            self._engine.abort_request(str(payload))

    def _drain_commands(self, block: bool) -> None:
        try:
            command, payload = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        embeds: list[EmbedRequest] = []
        while True:
            self._apply(command, payload, embeds)
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                break
        if embeds:
            self._run_embeds(embeds)

    def _run_embeds(self, embeds: list[EmbedRequest]) -> None:
        """Every embedding request that arrived since the last step goes through the model as one batch."""
        try:
            outputs = self._engine.embed(embeds)
        except ValueError as exc:
            for request in embeds:
                self._on_rejected(request.request_id, exc)
            return
        self._on_outputs(outputs, None)

    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, with the engine's stats when they are due: a clock read per step, a snapshot at
        most every STATS_INTERVAL_S, and always one when the engine has just run dry (so idle gauges read 0)."""
        now = time.monotonic()
        stats = None
        if now >= self._next_stats or not self._engine.has_unfinished_requests():
            stats, self._next_stats = self._engine.stats(), now + STATS_INTERVAL_S
        if outputs or stats is not None:
            self._on_outputs(outputs, stats)

    def _report_rejected(self) -> None:
        """Requests an engine failed after accepting them (a grammar that did not compile on its compile
        thread); engines that never do so have no `take_rejected`."""
        take = getattr(self._engine, "take_rejected", None)
        for request_id, exc in take() if take is not None else ():
            self._on_rejected(request_id, exc)

    def _run(self) -> None:
        release = getattr(self._engine, "release_idle_memory", None)
        idle_since: float | None = None  # None: busy (the idle clock starts at the next idle pass)
        try:
            while not self._stopping.is_set():
                busy = self._engine.has_unfinished_requests()
                self._drain_commands(block=not busy)
                if self._engine.has_unfinished_requests():
                    idle_since = None
                    self._hand_over(self._engine.step())
                    self._report_rejected()
                elif release is not None:
                    # Once per idle spell, after a pause, so back-to-back requests keep their warm pages.
                    now = time.monotonic()
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= RELEASE_MEMORY_AFTER_IDLE_S:
                        release()
                        idle_since = float("inf")  # released: not again until the next request
        except BaseException as exc:  # the engine is dead: every request on it must be failed, loudly
            log.exception("engine.dead")
            self._on_dead(exc)
