"""One trace from the HTTP request through NATS into the worker: the API (uvicorn in a thread) and a sim worker
(`engine_worker.main.serve`, in this process) both export to one in-memory exporter. A completion yields the
edge's `POST /v1/completions` span, continuing the client's traceparent, and under it the worker's `generate`
with `queue_wait`, `prefill` and `decode`, all with one trace id; the worker's log lines about the request carry
that trace id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_trace_id

import common.telemetry
from broker.embedded import EmbeddedNatsServer
from broker.tracing import trace_headers
from common.settings import Settings
from engine_worker.main import serve
from tests.integration.harness import ApiServer, wait_healthy

pytestmark = pytest.mark.asyncio

MODEL = "traced-sim"


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Every tracer opened while the test runs (the API's and the worker's) exports here."""
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(common.telemetry, "span_processor", lambda settings: SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
async def traced_stack(exported, tmp_path) -> AsyncIterator[ApiServer]:
    with EmbeddedNatsServer(tmp_path / "nats") as nats:
        settings = Settings(
            nats_url=nats.url,
            data_dir=tmp_path / "data",
            engine="sim",
            served_model_name=MODEL,
            sim_tokens_per_s=200.0,
            otel_exporter="console",
            auth="off",
            batch_runner=False,
        )
        stop = asyncio.Event()
        worker = asyncio.create_task(serve(settings, stop))
        api = ApiServer(settings).start()
        try:
            await wait_healthy(api.base_url, timeout=60)
            yield api
        finally:
            api.stop()
            stop.set()
            await asyncio.wait_for(worker, 30)


async def test_one_trace_from_the_edge_into_the_worker(traced_stack: ApiServer, exported) -> None:
    client_tracer = TracerProvider().get_tracer("client")
    with client_tracer.start_as_current_span("client call") as client_span:
        headers = trace_headers()
    trace_id = client_span.get_span_context().trace_id
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with httpx.AsyncClient(base_url=traced_stack.base_url, timeout=60) as http:
            response = await http.post(
                "/v1/completions", headers=headers, json={"model": MODEL, "prompt": "w5 w6", "max_tokens": 3}
            )
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 10  # the worker's spans end with its last event, the edge's after the body
        while not {"generate", "POST /v1/completions"} <= {span.name for span in exported.get_finished_spans()}:
            assert time.monotonic() < deadline, [span.name for span in exported.get_finished_spans()]
            await asyncio.sleep(0.05)

    spans = {span.name: span for span in exported.get_finished_spans()}
    edge = spans["POST /v1/completions"]
    assert edge.kind is SpanKind.SERVER
    assert edge.parent.span_id == client_span.get_span_context().span_id  # the client's trace goes on
    assert edge.attributes["http.response.status_code"] == 200
    generate = spans["generate"]
    assert generate.parent.span_id == edge.context.span_id
    for phase in ("queue_wait", "prefill", "decode"):
        assert spans[phase].parent.span_id == generate.context.span_id, phase
    assert {spans[name].context.trace_id for name in ("generate", "queue_wait", "prefill", "decode")} == {trace_id}
    assert edge.context.trace_id == trace_id
    assert generate.attributes["inferq.request_id"] == response.json()["id"]
    assert generate.attributes["inferq.completion_tokens"] == 3
    assert spans["queue_wait"].end_time <= spans["prefill"].start_time < spans["decode"].start_time
    assert spans["decode"].end_time <= generate.end_time

    [finished] = [line for line in logs if line.get("event") == "request.finished"]
    assert finished["request_id"] == response.json()["id"]
    assert finished["trace_id"] == format_trace_id(trace_id)
    assert finished["model"] == MODEL
    assert finished["worker_id"] == generate.attributes["inferq.worker_id"]
