"""OpenAI-style files and batch jobs as stored in JetStream (file records and jobs in KV, contents in the object
store), the job-queue ticket, and one stored line result. The batch lifecycle is a state machine here, so every
process that moves a job (the API on cancel, any runner) obeys the same transitions."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

from pydantic import Field

from contracts.base import SCHEMA_VERSION, Contract


class FilePurpose(StrEnum):
    BATCH = "batch"  # uploaded input
    BATCH_OUTPUT = "batch_output"  # written by a runner: results and errors


class FileRecord(Contract):
    v: int = SCHEMA_VERSION
    id: str
    filename: str
    purpose: FilePurpose
    bytes: int = Field(ge=0)
    created_at: int
    owner: str = Field(description="Caller identity that may see it (api/auth: `caller.owner`).")


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})

# validating → in_progress → finalizing → completed; failed on bad input; expired when the window passes (with the
# results so far); cancelling → cancelled. A runner may die anywhere: the next one resumes from the stored state.
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(
        {BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLING}
    ),
    BatchStatus.IN_PROGRESS: frozenset(
        {BatchStatus.FINALIZING, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLING}
    ),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED, BatchStatus.FAILED}),
}

_TIMESTAMP_FIELD = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLING: "cancelling_at",
    BatchStatus.CANCELLED: "cancelled_at",
}


class InvalidTransition(ValueError):
    """A status change the lifecycle does not allow (e.g. cancelling a completed batch)."""


class RequestCounts(Contract):
    total: int = 0
    completed: int = 0
    failed: int = 0

    def at_least(self, other: RequestCounts) -> RequestCounts:
        """Field-wise maximum: progress shown while a restarted runner re-counts never goes backwards."""
        return RequestCounts(
            total=max(self.total, other.total),
            completed=max(self.completed, other.completed),
            failed=max(self.failed, other.failed),
        )


class BatchErrorItem(Contract):
    """A reason the whole batch failed (per-line problems go to the error file instead)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class TokenTotals(Contract):
    input_tokens: int = 0
    output_tokens: int = 0


class BatchJob(Contract):
    v: int = SCHEMA_VERSION
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None = None
    status: BatchStatus = BatchStatus.VALIDATING
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: TokenTotals | None = None
    errors: list[BatchErrorItem] = Field(default_factory=list)
    runner_id: str | None = Field(default=None, description="The runner holding the current claim.")
    epoch: int = Field(default=0, ge=0, description="Bumped by every claim; a runner whose epoch is stale is fenced.")

    def transition(self, to: BatchStatus, now: int, **changes: Any) -> Self:
        """This job in status `to` (its timestamp set), or InvalidTransition."""
        if to not in TRANSITIONS.get(self.status, frozenset()):
            raise InvalidTransition(f"a batch that is {self.status.value} cannot become {to.value}")
        return self.model_copy(update={"status": to, _TIMESTAMP_FIELD[to]: now, **changes})

    def claimed_by(self, runner_id: str) -> Self:
        return self.model_copy(update={"runner_id": runner_id, "epoch": self.epoch + 1})


class BatchTicket(Contract):
    """The job-queue message: which batch to run. Everything else is read from KV, so a ticket never goes stale."""

    v: int = SCHEMA_VERSION
    batch_id: str


class LineError(Contract):
    code: str
    message: str


class LineResult(Contract):
    """What one input line produced, stored once under its custom_id: the first stored result wins, so a line is
    never run into the output twice whatever restarts happen."""

    v: int = SCHEMA_VERSION
    custom_id: str
    status_code: int
    request_id: str | None = None
    body: dict[str, Any] | None = None
    error: LineError | None = None
    usage: TokenTotals = Field(default_factory=TokenTotals)

    @property
    def succeeded(self) -> bool:
        return self.status_code == 200
