"""Wire messages shared by the edge, the workers and direct NATS publishers. Data only: no I/O, no NATS,
no torch. JSON on the wire; `contracts.schema.export_json_schema()` publishes the schema for other languages."""

from contracts.base import SCHEMA_VERSION, Contract
from contracts.batch import BatchJob, BatchStatus, BatchTicket, FilePurpose, FileRecord, LineResult
from contracts.errors import ErrorCode, ErrorInfo
from contracts.events import (
    LOGPROB_FLOOR,
    Accepted,
    ChoiceDelta,
    Embeddings,
    EmbeddingVector,
    End,
    Failed,
    FinishReason,
    Heartbeat,
    TokenEvent,
    TokenLogprob,
    Tokens,
    TopLogprob,
    Usage,
    parse_event,
)
from contracts.requests import (
    CancelRequest,
    EmbedRequest,
    GenerateRequest,
    Pooling,
    WorkRequest,
    parse_work_request,
)
from contracts.sampling import SamplingParams
from contracts.workers import DeviceInfo, WorkerInfo

__all__ = [
    "LOGPROB_FLOOR",
    "SCHEMA_VERSION",
    "Accepted",
    "BatchJob",
    "BatchStatus",
    "BatchTicket",
    "CancelRequest",
    "ChoiceDelta",
    "Contract",
    "DeviceInfo",
    "EmbedRequest",
    "EmbeddingVector",
    "Embeddings",
    "End",
    "ErrorCode",
    "ErrorInfo",
    "Failed",
    "FilePurpose",
    "FileRecord",
    "FinishReason",
    "GenerateRequest",
    "Heartbeat",
    "LineResult",
    "Pooling",
    "WorkRequest",
    "parse_work_request",
    "SamplingParams",
    "TokenEvent",
    "TokenLogprob",
    "Tokens",
    "TopLogprob",
    "Usage",
    "WorkerInfo",
    "parse_event",
]
