"""One error mapping, two shapes: Anthropic's on `/v1/messages…`, OpenAI's everywhere else."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.errors import ApiError, install_error_handlers
from contracts import ErrorCode


def _client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/messages")
    @app.post("/v1/chat/completions")
    async def full() -> None:
        raise ApiError(ErrorCode.QUEUE_FULL, "the queue is full", retry_after=3)

    @app.post("/v1/messagesX")
    async def lookalike() -> None:
        raise ApiError(ErrorCode.NO_WORKER, "no worker")

    return TestClient(app, raise_server_exceptions=False)


def test_anthropic_routes_get_anthropic_errors_with_the_same_status_and_headers() -> None:
    client = _client()
    anthropic = client.post("/v1/messages")
    assert anthropic.status_code == 429 and anthropic.headers["retry-after"] == "3"
    assert anthropic.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": "the queue is full"}}
    openai = client.post("/v1/chat/completions")
    assert openai.status_code == 429 and openai.json()["error"]["code"] == "queue_full"
    # Starlette's own refusals under the prefix (an unknown sub-path) are Anthropic-shaped too.
    assert client.post("/v1/messages/nope").json()["error"]["type"] == "not_found_error"
    # Only the prefix as a path segment: a lookalike path keeps OpenAI's shape.
    lookalike = client.post("/v1/messagesX")
    assert lookalike.status_code == 503 and lookalike.json()["error"]["code"] == "no_worker"
