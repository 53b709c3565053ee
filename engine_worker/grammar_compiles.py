"""Grammar compiles off the engine thread (issue #16). A constrained request whose grammar this worker has not
compiled yet waits here, unscheduled, while a compile thread builds the parser (0.5-5 ms for common schemas, up to
the parser limits' worth for a large one; llguidance drops the GIL while it builds), so the rest of the batch keeps
stepping. Requests that ask for the same grammar meanwhile share its one compile.

Threads: `add`, `finished` and `wait` run on the engine thread, which owns the compiled-grammar cache and every
matcher; a compile thread only ever runs `compile(constraint)` and returns a new pristine matcher, which the engine
thread receives through `finished` once the compile has ended."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import llguidance

from contracts.constraints import Constraint

if TYPE_CHECKING:
    from engine_worker.sequence import RequestState

# Two: one slow schema (up to the limits' worth) does not hold up every other new grammar behind it; more would
# only compete with the forward pass for the cores.
COMPILE_THREADS = 2

Outcome = llguidance.LLMatcher | Exception  # the pristine matcher, or what the compile raised


class PendingCompiles:
    def __init__(
        self,
        compile: Callable[[Constraint], llguidance.LLMatcher],
        store: Callable[[str, llguidance.LLMatcher], None],
        threads: int = COMPILE_THREADS,
    ) -> None:
        """`compile` runs on a compile thread; `store(key, pristine)` on the engine thread, once per successful
        compile, before the requests waiting for it are handed back."""
        self._compile = compile
        self._store = store
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None  # started by the first compile: most workers never need one
        self._in_flight: dict[str, Future[llguidance.LLMatcher]] = {}  # constraint key -> its compile
        self._waiting: list[tuple[RequestState, Future[llguidance.LLMatcher]]] = []  # in arrival order

    def __len__(self) -> int:
        """Requests waiting for a compile."""
        return len(self._waiting)

    def add(self, state: RequestState, key: str, constraint: Constraint) -> None:
        """`state` waits for the grammar of `constraint` (`key`: its `constraint_key`), compiled once however
        many requests wait for it."""
        future = self._in_flight.get(key)
        if future is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="inferq-grammar")
            future = self._in_flight[key] = self._pool.submit(self._compile, constraint)
        self._waiting.append((state, future))

    def finished(self) -> list[tuple[RequestState, Outcome]]:
        """The waiting requests whose compile has ended, in the order they came, each with its outcome; the
        successful compiles go to `store` first. Never blocks."""
        for key, future in list(self._in_flight.items()):
            if future.done():
                del self._in_flight[key]
                if future.exception() is None:
                    self._store(key, future.result())
        ready, still = [], []
        for state, future in self._waiting:  # one pass: a compile may end while this runs
            if future.done():
                ready.append((state, _outcome(future)))
            else:
                still.append((state, future))
        self._waiting = still
        return ready

    def wait(self, timeout: float) -> None:
        """Block until a compile some request waits for ends, or `timeout` seconds (for an engine with nothing
        else to do: waiting beats spinning, and commands still get in every `timeout`)."""
        if self._waiting:
            wait({future for _, future in self._waiting}, timeout=timeout, return_when=FIRST_COMPLETED)


def _outcome(future: Future[llguidance.LLMatcher]) -> Outcome:
    exc = future.exception()
    return future.result() if exc is None else exc
