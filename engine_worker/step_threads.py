"""torch threads per step, by load. A step of a few rows is a chain of small GEMMs that a second thread speeds up
while nothing else runs; a step of many rows means many streams, whose api, NATS and clients then compete for the
cores, and an OpenMP region waits for its slowest thread, so extra threads hurt (reference: engine_cpu.md,
"Contention"). The engine thread sets the count before each step; `torch.set_num_threads` is called only when the
count changes (it costs microseconds, measured in docs/benchmarks.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepThreadRule:
    """`small_step_threads` for steps of at most `small_step_rows` rows, `base_threads` otherwise."""

    base_threads: int
    small_step_threads: int
    small_step_rows: int

    def threads_for(self, rows: int) -> int:
        return self.small_step_threads if 0 < rows <= self.small_step_rows else self.base_threads


class StepThreads:
    """Applies a `StepThreadRule` through `set_threads` (torch.set_num_threads), remembering the count it applied
    and on which thread: OpenMP's thread count is a setting of each thread, and the steps that warm up compiled
    graphs run on the loading thread, the real ones on the engine thread."""

    def __init__(self, rule: StepThreadRule, set_threads: Callable[[int], None]) -> None:
        self.rule, self._set = rule, set_threads
        self._applied: tuple[int, int] | None = None  # (thread ident, count)

    @property
    def current(self) -> int:
        """The count last applied on the calling thread (0: none yet)."""
        applied = self._applied
        return applied[1] if applied is not None and applied[0] == threading.get_ident() else 0

    def before_step(self, rows: int) -> int:
        threads = self.rule.threads_for(rows)
        if threads != self.current:
            self._set(threads)
            self._applied = (threading.get_ident(), threads)
        return threads
