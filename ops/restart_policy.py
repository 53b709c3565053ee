"""When a supervised process that died is started again: exponential backoff, and a crash loop gives up.

Pure bookkeeping on timestamps the caller passes in (no clock, no processes), so the policy is unit-tested
without waiting. One `CrashHistory` per supervised process."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.process import EXIT_CONFIG


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    crash_loop_crashes: int = 5  # this many crashes within `crash_loop_window_s` ...
    crash_loop_window_s: float = 60.0  # ... and the process is not started again

    def backoff_s(self, consecutive: int) -> float:
        """Delay before restart number `consecutive` (1-based) of a run of crashes: initial, 2x, 4x, ... capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, consecutive - 1))


@dataclass(frozen=True, slots=True)
class Restart:
    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


@dataclass
class CrashHistory:
    """The crashes of one process. A process that ran for a whole window without crashing starts its backoff
    from the beginning again: one crash a day is not a loop."""

    policy: RestartPolicy
    _recent: deque[float] = field(default_factory=deque)  # crash times inside the window
    _consecutive: int = 0

    def crashed(self, now: float, started_at: float, returncode: int) -> Restart | GiveUp:
        """Record a crash at `now` of a run that began at `started_at`; say what to do about it."""
        if returncode == EXIT_CONFIG:
            return GiveUp(
                f"it refused to start because of its configuration (exit code {EXIT_CONFIG}); "
                "see its last log lines, fix the setting and start again"
            )
        window = self.policy.crash_loop_window_s
        if now - started_at >= window:
            self._consecutive = 0
        self._recent.append(now)
        while self._recent and now - self._recent[0] > window:
            self._recent.popleft()
        if len(self._recent) >= self.policy.crash_loop_crashes:
            return GiveUp(
                f"it crashed {len(self._recent)} times within {window:g} s (crash loop); its last log lines say why"
            )
        self._consecutive += 1
        return Restart(self.policy.backoff_s(self._consecutive))
