"""Batch input lines: reading them one at a time, judging each (deterministically, so the finalizer re-reading the
file reaches the same verdicts as the run did), running a valid one through the same serving function as its
HTTP endpoint, and the OpenAI output and error line shapes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from api.errors import ApiError, api_error_body, as_api_error, validation_message
from api.schemas.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, OpenAIRequest
from api.services import Services
from api.serving.chat import chat_completion_response
from api.serving.completions import completion_response
from api.serving.embeddings import embeddings_response
from broker.errors import BrokerError
from contracts import ErrorCode, LineResult
from contracts.batch import LineError, TokenTotals

_MAX_CUSTOM_ID = 512
# Failures worth waiting out (a worker restarting, a full queue): the line runs again rather than fail.
RETRYABLE = frozenset(
    {
        ErrorCode.NO_WORKER,
        ErrorCode.WORKER_LOST,
        ErrorCode.UNAVAILABLE,
        ErrorCode.QUEUE_FULL,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.RATE_LIMITED,
    }
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    schema: type[OpenAIRequest]
    respond: Callable[[Any, Services], Awaitable[dict]]


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(ChatCompletionRequest, chat_completion_response),
    "/v1/completions": Endpoint(CompletionRequest, completion_response),
    "/v1/embeddings": Endpoint(EmbeddingRequest, embeddings_response),
}


@dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # 1-based line number in the input file
    custom_id: str
    body: OpenAIRequest


@dataclass(frozen=True, slots=True)
class InvalidLine:
    number: int
    custom_id: str | None
    error: LineError


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for every non-blank line, read from disk one at a time."""
    with path.open("rb") as source:
        for number, raw in enumerate(source, start=1):
            if raw.strip():
                yield number, raw


class LineParser:
    """Judges lines in file order. Remembers a digest of every custom_id seen (not the lines), so a duplicate is
    refused without holding the file in memory."""

    def __init__(self, endpoint: str):
        self._url = endpoint
        self._endpoint = ENDPOINTS[endpoint]
        self._seen: set[bytes] = set()

    def parse(self, number: int, raw: bytes) -> BatchLine | InvalidLine:
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _invalid(number, None, "invalid_json", f"line {number} is not JSON: {exc}")
        if not isinstance(line, dict):
            return _invalid(number, None, "invalid_request", "a line must be a JSON object")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return _invalid(number, None, "missing_custom_id", "custom_id must be a non-empty string")
        if len(custom_id) > _MAX_CUSTOM_ID or not custom_id.isprintable():
            return _invalid(
                number,
                None,
                "invalid_custom_id",
                f"custom_id must be printable and at most {_MAX_CUSTOM_ID} characters",
            )
        digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()
        if digest in self._seen:
            return _invalid(
                number,
                custom_id,
                "duplicate_custom_id",
                f"custom_id {custom_id!r} is used by an earlier line; custom_ids must be unique",
            )
        self._seen.add(digest)
        if line.get("method", "POST") != "POST":
            return _invalid(number, custom_id, "invalid_method", "method must be POST")
        if line.get("url") != self._url:
            return _invalid(
                number,
                custom_id,
                "invalid_url",
                f"url {line.get('url')!r} does not match the batch's endpoint {self._url}",
            )
        return self._body(number, custom_id, line.get("body"))

    def _body(self, number: int, custom_id: str, body: object) -> BatchLine | InvalidLine:
        if not isinstance(body, dict):
            return _invalid(number, custom_id, "invalid_request", "body must be a JSON object")
        if body.get("stream"):
            return _invalid(number, custom_id, "invalid_request", "stream is not available in a batch")
        try:
            return BatchLine(number, custom_id, self._endpoint.schema.model_validate(body))
        except ValidationError as exc:
            message, _ = validation_message(exc)
            return _invalid(number, custom_id, "invalid_request", message)


def _invalid(number: int, custom_id: str | None, code: str, message: str) -> InvalidLine:
    return InvalidLine(number, custom_id, LineError(code=code, message=message))


class RetryLater(Exception):
    """The line could not run for a passing reason (no worker right now, queue full): run it again later."""

    def __init__(self, error: ApiError):
        super().__init__(error.info.message)
        self.code = error.info.code
        self.retry_after = error.retry_after or 1.0


async def run_line(line: BatchLine, endpoint: str, services: Services) -> LineResult:
    """The line's result as its endpoint would have answered it; RetryLater for passing failures."""
    try:
        body = await ENDPOINTS[endpoint].respond(line.body, services)
    except (ApiError, BrokerError, ValidationError) as exc:  # what the endpoint would have answered with a status
        error = as_api_error(exc)
        if error.info.code in RETRYABLE:
            raise RetryLater(error) from exc
        return failed_result(line.custom_id, error)
    usage = body.get("usage") or {}
    return LineResult(
        custom_id=line.custom_id,
        status_code=200,
        request_id=body.get("id"),
        body=body,
        usage=TokenTotals(input_tokens=usage.get("prompt_tokens", 0), output_tokens=usage.get("completion_tokens", 0)),
    )


def failed_result(custom_id: str, error: ApiError) -> LineResult:
    """A line the endpoint answered with an error: the status and body it would have sent, and the error."""
    return LineResult(
        custom_id=custom_id,
        status_code=error.status,
        body=api_error_body(error),
        error=LineError(code=error.info.code.value, message=error.info.message),
    )


def line_id(batch_id: str, custom_id: str | None, number: int) -> str:
    """Stable per line, so assembling a batch's files twice gives the same files."""
    digest = hashlib.sha256(f"{batch_id}\0{custom_id}\0{number}".encode()).hexdigest()[:24]
    return f"batch_req_{digest}"


def result_line(batch_id: str, number: int, result: LineResult) -> dict:
    """`{id, custom_id, response: {status_code, request_id, body}, error}`; a failed request carries both its
    HTTP-style response and the error."""
    return {
        "id": line_id(batch_id, result.custom_id, number),
        "custom_id": result.custom_id,
        "response": {"status_code": result.status_code, "request_id": result.request_id, "body": result.body},
        "error": None if result.error is None else result.error.model_dump(),
    }


def error_line(batch_id: str, number: int, custom_id: str | None, error: LineError) -> dict:
    """A line that never reached a model (invalid, or not run before the batch ended): no response."""
    return {
        "id": line_id(batch_id, custom_id, number),
        "custom_id": custom_id,
        "response": None,
        "error": error.model_dump(),
    }
