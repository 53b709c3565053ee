"""The worker's measurements: Prometheus bucket semantics, what one request's timeline contributes to each
histogram and counter, and the spans it becomes."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.tracing import extract_context, trace_headers
from contracts import ChoiceDelta, EmbedRequest, FinishReason, GenerateRequest, Usage
from contracts.constraints import JsonSchemaConstraint, RegexConstraint
from engine_worker.metrics import (
    ITL_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    RequestTimeline,
    WorkerMeters,
    WorkerTelemetry,
    record_spans,
)
from engine_worker.outputs import EngineStats, RequestOutput


def test_histogram_buckets_are_le_with_an_overflow_bucket() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot.counts == [2, 2, 1]  # 0.1 sits in the 0.1 bucket, 1.0 in the 1.0 bucket, 7 overflows
    assert snapshot.count == 5
    assert snapshot.sum == pytest.approx(8.65)


def test_vllm_boundaries() -> None:
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0
    assert list(TTFT_BUCKETS) == sorted(TTFT_BUCKETS)


def test_a_request_timeline_feeds_each_meter() -> None:
    # Published 2 s before it was accepted; tokens 0.3, 0.5 and 0.6 s after accept; ends at 0.7 s.
    timeline = RequestTimeline(published_at=1000.0, accepted_at=1002.0, accepted_mono=50.0)
    meters = WorkerMeters()
    meters.accepted(timeline)
    for mono in (50.3, 50.5, 50.6):
        meters.tokens(timeline, now=mono)
    meters.finished(timeline, Usage(prompt_tokens=7, completion_tokens=3), "length", now=50.7)

    snapshot = meters.snapshot(
        "w1",
        "m",
        EngineStats(running=1, waiting=2, kv_cache_usage=0.25, preemptions=4, draft_tokens=40, accepted_tokens=30),
    )
    assert snapshot.request_queue_time_seconds.sum == pytest.approx(2.0)
    assert snapshot.time_to_first_token_seconds.count == 1
    assert snapshot.time_to_first_token_seconds.sum == pytest.approx(2.3)  # queue wait included, as in vLLM
    assert snapshot.inter_token_latency_seconds.count == 2
    assert snapshot.inter_token_latency_seconds.sum == pytest.approx(0.3)
    assert snapshot.e2e_request_latency_seconds.sum == pytest.approx(2.7)
    assert (snapshot.prompt_tokens_total, snapshot.generation_tokens_total) == (7, 3)
    assert snapshot.request_success_total == {"length": 1}
    assert (snapshot.num_requests_running, snapshot.num_requests_waiting) == (1, 2)
    assert (snapshot.kv_cache_usage_perc, snapshot.num_preemptions_total) == (0.25, 4)
    assert (snapshot.spec_decode_num_draft_tokens_total, snapshot.spec_decode_num_accepted_tokens_total) == (40, 30)


def test_queue_time_is_clamped_when_clocks_disagree() -> None:
    timeline = RequestTimeline(published_at=1005.0, accepted_at=1000.0, accepted_mono=0.0)
    assert timeline.queue_time == 0.0


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_spans_nest_under_the_remote_parent(spans) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /v1/completions") as edge:
        headers = trace_headers()
    timeline = RequestTimeline(
        published_at=100.0, accepted_at=100.5, accepted_mono=10.0, first_token_mono=10.2, finished_mono=11.0
    )
    record_spans(tracer, extract_context(headers), timeline, {"inferq.request_id": "r1"})

    by_name = {span.name: span for span in exporter.get_finished_spans()}
    assert set(by_name) == {"POST /v1/completions", "generate", "queue_wait", "prefill", "decode"}
    generate = by_name["generate"]
    assert generate.parent.span_id == edge.get_span_context().span_id
    assert {span.context.trace_id for span in by_name.values()} == {edge.get_span_context().trace_id}
    for phase in ("queue_wait", "prefill", "decode"):
        assert by_name[phase].parent.span_id == generate.context.span_id
    assert (generate.start_time, generate.end_time) == (100_000_000_000, 101_500_000_000)
    assert by_name["queue_wait"].end_time == by_name["prefill"].start_time == 100_500_000_000
    assert by_name["prefill"].end_time == by_name["decode"].start_time == 100_700_000_000
    assert generate.attributes["inferq.request_id"] == "r1"


def test_finish_reason_is_choice_zeros(spans) -> None:
    telemetry = WorkerTelemetry("w1", "m", spans[0].get_tracer("test"))
    request = GenerateRequest(request_id="r1", model="m", prompt_token_ids=[1], reply_subject="x")
    flight = telemetry.accepted(request, published_at=0.0, headers=None)
    assert flight.log_fields == {"request_id": "r1", "model": "m", "worker_id": "w1"}  # no trace: no trace_id
    telemetry.output(
        flight,
        RequestOutput(
            "r1",
            [
                ChoiceDelta(index=1, token_ids=[5], finish_reason=FinishReason.STOP),
                ChoiceDelta(index=0, token_ids=[6], finish_reason=FinishReason.LENGTH),
            ],
        ),
    )
    telemetry.finished(flight, Usage(prompt_tokens=1, completion_tokens=2))
    snapshot = telemetry.snapshot(EngineStats(0, 0))
    assert snapshot.request_success_total == {"length": 1}
    assert snapshot.time_to_first_token_seconds.count == 1
    assert [span.name for span in spans[1].get_finished_spans()][-1] == "generate"


def test_constrained_requests_are_counted_by_kind() -> None:
    telemetry = WorkerTelemetry("w1", "m")
    requests = [
        GenerateRequest(request_id=f"r{i}", model="m", prompt_token_ids=[1], reply_subject="x", constraint=constraint)
        for i, constraint in enumerate(
            [
                None,
                JsonSchemaConstraint(json_schema={"type": "object"}),
                JsonSchemaConstraint(json_schema={"type": "string"}),
                RegexConstraint(pattern="[a-z]+"),
            ]
        )
    ]
    for request in requests:
        telemetry.accepted(request, published_at=0.0, headers=None)
    telemetry.accepted(EmbedRequest(request_id="e", model="m", inputs=[[1]], reply_subject="x"), 0.0, None)
    assert telemetry.snapshot(EngineStats(0, 0)).structured_requests_total == {"json_schema": 2, "regex": 1}
