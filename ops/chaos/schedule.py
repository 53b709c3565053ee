"""The seeded fault schedule: which process to SIGKILL or SIGSTOP, when, and for how long. The same seed and
duration give the same sequence of faults, so a failing run is reproduced with its seed.

One fault at a time, and the next one only after the last victim is back and ready: every fault is then one
the system promises to ride out (two of three NATS nodes down is no quorum, both api replicas down is no edge),
and a failure points at a single event."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    KILL = "kill"  # SIGKILL, then started again on the same settings (and store)
    FREEZE = "freeze"  # SIGSTOP, then SIGCONT: the process comes back with stale state and timers


@dataclass(frozen=True, slots=True)
class Fault:
    gap_s: float  # quiet time before it, counted from the previous victim being ready again
    action: Action
    target: str  # "api-0", "worker-1", "nats-2"
    down_s: float  # how long the target stays dead or frozen

    def __str__(self) -> str:
        return f"{self.action.value} {self.target} for {self.down_s:.1f} s after {self.gap_s:.1f} s"


def fault_schedule(
    seed: int,
    duration_s: float,
    targets: list[str],
    *,
    gap_s: tuple[float, float] = (2.0, 6.0),
    kill_down_s: tuple[float, float] = (0.5, 4.0),
    freeze_down_s: tuple[float, float] = (1.0, 8.0),
) -> list[Fault]:
    """Faults whose nominal gaps and downtimes fill `duration_s` (the real run is longer: restarts take time).
    Freezes run past the edge's 3 s worker-silence timeout about half the time: both sides of it get hit."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    elapsed = 0.0
    while True:
        action = rng.choice(list(Action))
        low, high = kill_down_s if action is Action.KILL else freeze_down_s
        fault = Fault(
            gap_s=round(rng.uniform(*gap_s), 2),
            action=action,
            target=rng.choice(targets),
            down_s=round(rng.uniform(low, high), 2),
        )
        elapsed += fault.gap_s + fault.down_s
        if elapsed > duration_s:
            return faults
        faults.append(fault)
