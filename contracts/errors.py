"""Machine-readable error codes. Only api/errors.py turns them into HTTP statuses."""

from __future__ import annotations

from enum import StrEnum

from contracts.base import Contract


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker"
    WORKER_LOST = "worker_lost"
    WORKER_CRASHED = "worker_crashed"  # its workers died max_deliver times running it: given up, not retried
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    UNAUTHENTICATED = "invalid_api_key"  # OpenAI's code for a missing or wrong key
    PERMISSION_DENIED = "permission_denied"
    RATE_LIMITED = "rate_limit_exceeded"  # OpenAI's code for a per-key limit
    ALREADY_EXISTS = "already_exists"


class ErrorInfo(Contract):
    code: ErrorCode
    message: str
    param: str | None = None
