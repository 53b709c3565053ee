"""What the edge makes of the `worker_crashed` error a max-deliveries watcher publishes for a request whose workers
all died (broker/max_deliveries.py; tests/broker/test_max_deliveries.py has the watcher itself): an HTTP client gets a
clear 500 at once, not a wait for the queue timeout, and a batch line becomes one error line instead of being run
again (on three more workers) as a passing failure."""

from __future__ import annotations

import asyncio

import pytest

from api.batch import lines
from api.batch.lines import BatchLine, Endpoint, RetryLater, run_line
from api.errors import ApiError
from api.generation import Generation, Timeouts
from contracts import Accepted, ChoiceDelta, ErrorCode, ErrorInfo, Failed, GenerateRequest, Tokens

pytestmark = pytest.mark.asyncio


class QueuedPort:
    """An engine client whose request sits in the queue (as a message past max_deliver does until the watcher
    removes it); records resubmissions."""

    timeouts = Timeouts(queue_s=60.0, silence_s=0.05)

    def __init__(self) -> None:
        self.published: list[GenerateRequest] = []

    async def publish(self, request: GenerateRequest) -> bool:
        self.published.append(request)
        return True

    async def still_queued(self, request: GenerateRequest) -> bool | None:
        return True

    async def cancel(self, request_id: str, attempt: int | None = None) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


REQUEST = GenerateRequest(request_id="r", model="m", prompt_token_ids=[1, 2], reply_subject="inf.live.e.r")
# As the watcher publishes it for a live request: the attempt the edge published, seq 1.
CRASHED = Failed(
    request_id="r",
    attempt=1,
    seq=1,
    error=ErrorInfo(code=ErrorCode.WORKER_CRASHED, message="the request's workers died 3 times running it"),
)


def dead_deliveries_then_the_error() -> asyncio.Queue:
    """Two workers died right after announcing the request, the third after two tokens; then the watcher's error,
    whose seq (1) is behind what the edge saw: not a gap, the end."""
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(3):
        queue.put_nowait(Accepted(request_id="r", attempt=1, seq=0, worker_id="w"))
    for seq, token in ((1, 7), (2, 8)):
        queue.put_nowait(Tokens(request_id="r", attempt=1, seq=seq, choices=[ChoiceDelta(index=0, token_ids=[token])]))
    queue.put_nowait(CRASHED)
    return queue


async def generate_all(port: QueuedPort, events: asyncio.Queue) -> list:
    return [event async for event in Generation(port, REQUEST, events)]


async def test_an_http_client_gets_a_clear_500_not_a_resubmission() -> None:
    port = QueuedPort()
    with pytest.raises(ApiError) as failure:
        await asyncio.wait_for(generate_all(port, dead_deliveries_then_the_error()), 10)
    assert failure.value.info.code is ErrorCode.WORKER_CRASHED
    assert failure.value.status == 500 and failure.value.retry_after is None
    assert port.published == []  # not sent to more workers


async def test_a_batch_line_becomes_one_error_line_not_a_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    port = QueuedPort()

    async def respond(body, services) -> dict:  # the serving function, reduced to iterating the generation
        await generate_all(port, dead_deliveries_then_the_error())
        return {}

    monkeypatch.setitem(
        lines.ENDPOINTS, "/v1/completions", Endpoint(lines.ENDPOINTS["/v1/completions"].schema, respond)
    )
    try:
        result = await run_line(BatchLine(1, "line-1", None), "/v1/completions", None)
    except RetryLater:
        pytest.fail("a request that kills its workers was taken for a passing failure and would run again")
    assert result.custom_id == "line-1" and result.status_code == 500
    assert result.error is not None and result.error.code == "worker_crashed"
    assert port.published == []
