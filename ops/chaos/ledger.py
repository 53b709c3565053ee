"""What the chaos run's clients saw, and the invariants checked over it at the end.

Clients record one `Outcome` per request (completed with a text, or a clear error in the API's shape) and a
`problem` the moment they see something the system promises never to do: a text that differs from the
undisturbed greedy run, a chunk repeated or skipped across a resume, a request without an answer by its
deadline. Checks that need the whole run (one generation per Idempotency-Key, batch lines) add problems at
the end."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Outcome:
    client: str
    kind: str  # "stream", "chat", "direct", "batch-line"
    ok: bool
    seconds: float
    resumes: int = 0  # reconnects (Last-Event-ID or a retried POST) it took
    error: str = ""  # the clear error it got instead of an answer


@dataclass
class Ledger:
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    keys: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # Idempotency-Key → request ids

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def problem(self, client: str, message: str) -> None:
        self.problems.append(f"{client}: {message}")

    def keyed(self, key: str, request_id: str) -> None:
        self.keys[key].add(request_id)

    def check_keys(self, accepted: Counter[tuple[str, int]]) -> None:
        """No request generated twice for one Idempotency-Key: every key names one request id, and no attempt of
        it was accepted by a worker more than once (a new attempt is the edge resuming it from the delivered
        tokens after its worker fell silent, not a second generation)."""
        for key, request_ids in self.keys.items():
            if len(request_ids) != 1:
                self.problem(key, f"one Idempotency-Key got {len(request_ids)} requests: {sorted(request_ids)}")
            for request_id in request_ids:
                twice = {attempt: n for (rid, attempt), n in accepted.items() if rid == request_id and n > 1}
                if twice:
                    self.problem(key, f"{request_id} generated more than once (attempt: times accepted) {twice}")

    def summary(self) -> dict:
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for outcome in self.outcomes:
            by_kind[outcome.kind]["ok" if outcome.ok else "error"] += 1
            by_kind[outcome.kind]["resumed"] += outcome.resumes > 0
        errors = Counter(outcome.error for outcome in self.outcomes if not outcome.ok)
        slowest = max((outcome.seconds for outcome in self.outcomes), default=0.0)
        return {
            "seed": self.seed,
            "requests": {kind: dict(counts) for kind, counts in by_kind.items()},
            "errors": dict(errors),
            "slowest_s": round(slowest, 1),
            "keys": len(self.keys),
            "problems": len(self.problems),
        }


def accepted_attempts(worker_logs: list[Path]) -> Counter[tuple[str, int]]:
    """(request id, attempt) → how many times a worker accepted it, from the workers' `request.accepted` log
    lines (written unbuffered, so a SIGKILLed worker's acceptances are there too)."""
    accepted: Counter[tuple[str, int]] = Counter()
    for path in worker_logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if '"request.accepted"' not in line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a SIGKILLed process
            accepted[(entry["request_id"], int(entry.get("attempt", 1)))] += 1
    return accepted
