"""What the worker observes about the requests it serves. Each attempt's timeline (published → accepted → first
token → end) becomes vLLM-style counters and histograms for scrapes (`WorkerMetrics`), the request's spans
(`generate` ⊃ `queue_wait`, `prefill`, `decode`, under the edge's trace) and the log context of its lines
(request_id, model, worker_id, trace_id). Plain counts and bucket arrays: no Prometheus library here, the edge
renders them. Everything runs on the bridge's event loop; `WorkerTelemetry` is the bridge's one handle on it."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode, Tracer

from broker.tracing import extract_context, trace_id_of
from contracts import EmbedRequest, GenerateRequest, Usage
from contracts.metrics import HistogramSnapshot, WorkerMetrics
from engine_worker.outputs import EngineStats, RequestOutput

log = structlog.get_logger(__name__)

# vLLM's boundaries (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus buckets are `le`: a value on a bound is in it
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(bounds=list(self.bounds), counts=list(self.counts), sum=self.sum)


@dataclass(slots=True)
class RequestTimeline:
    """One attempt's moments on this worker. `published_at` is the JetStream timestamp (the NATS server's clock);
    the rest is measured here on the monotonic clock and anchored to wall time once, at accept, so only the queue
    wait crosses clocks (and is clamped at 0 if they disagree)."""

    published_at: float
    accepted_at: float = field(default_factory=time.time)
    accepted_mono: float = field(default_factory=time.monotonic)
    first_token_mono: float | None = None
    last_token_mono: float | None = None
    finished_mono: float | None = None

    @property
    def queue_time(self) -> float:
        return max(0.0, self.accepted_at - self.published_at)

    def since_publish(self, mono: float) -> float:
        return self.queue_time + (mono - self.accepted_mono)

    def wall(self, mono: float) -> float:
        return self.accepted_at + (mono - self.accepted_mono)

    def tokens_arrived(self, now: float) -> float | None:
        """Record a delivery of new tokens; returns the gap since the previous one (None for the first)."""
        previous = self.last_token_mono
        self.last_token_mono = now
        if previous is None:
            self.first_token_mono = now
            return None
        return now - previous


class WorkerMeters:
    """Cumulative counters and histograms of one worker since it started."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.successes: Counter[str] = Counter()
        self.structured: Counter[str] = Counter()  # accepted constrained requests, by constraint type

    def accepted(self, timeline: RequestTimeline, constraint_type: str | None = None) -> None:
        self.queue_time.observe(timeline.queue_time)
        if constraint_type is not None:
            self.structured[constraint_type] += 1

    def tokens(self, timeline: RequestTimeline, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        gap = timeline.tokens_arrived(now)
        if gap is None:
            self.ttft.observe(timeline.since_publish(now))
        else:
            self.itl.observe(gap)

    def finished(self, timeline: RequestTimeline, usage: Usage, finish_reason: str, now: float | None = None) -> None:
        timeline.finished_mono = time.monotonic() if now is None else now
        self.e2e.observe(timeline.since_publish(timeline.finished_mono))
        self.prompt_tokens += usage.prompt_tokens
        self.generation_tokens += usage.completion_tokens
        self.successes[finish_reason] += 1

    def snapshot(self, worker_id: str, model: str, stats: EngineStats) -> WorkerMetrics:
        return WorkerMetrics(
            worker_id=worker_id,
            model=model,
            sent_at=time.time(),
            num_requests_running=stats.running,
            num_requests_waiting=stats.waiting,
            kv_cache_usage_perc=stats.kv_cache_usage,
            num_preemptions_total=stats.preemptions,
            spec_decode_num_draft_tokens_total=stats.draft_tokens,
            spec_decode_num_accepted_tokens_total=stats.accepted_tokens,
            prefix_cache_queries_total=stats.prefix_cache_queries,
            prefix_cache_hits_total=stats.prefix_cache_hits,
            prompt_tokens_total=self.prompt_tokens,
            generation_tokens_total=self.generation_tokens,
            request_success_total=dict(self.successes),
            structured_requests_total=dict(self.structured),
            time_to_first_token_seconds=self.ttft.snapshot(),
            inter_token_latency_seconds=self.itl.snapshot(),
            e2e_request_latency_seconds=self.e2e.snapshot(),
            request_queue_time_seconds=self.queue_time.snapshot(),
        )


def record_spans(
    tracer: Tracer, parent: Context | None, timeline: RequestTimeline, attributes: dict, error: str | None = None
) -> None:
    """The request's spans, made once it ended (all moments are known by then): `generate` from publish to end,
    with `queue_wait` (publish → accept), `prefill` (accept → first token) and `decode` (first token → end)."""
    end = timeline.finished_mono if timeline.finished_mono is not None else time.monotonic()

    def ns(wall: float) -> int:
        return int(wall * 1e9)

    start = min(timeline.published_at, timeline.accepted_at)
    generate = tracer.start_span("generate", context=parent, start_time=ns(start), attributes=attributes)
    inside = trace.set_span_in_context(generate)
    phases = [("queue_wait", start, timeline.accepted_at)]
    if timeline.first_token_mono is not None:
        first = timeline.wall(timeline.first_token_mono)
        phases += [("prefill", timeline.accepted_at, first), ("decode", first, timeline.wall(end))]
    else:
        phases.append(("prefill", timeline.accepted_at, timeline.wall(end)))
    for name, begin, finish in phases:
        tracer.start_span(name, context=inside, start_time=ns(begin)).end(end_time=ns(finish))
    if error is not None:
        generate.set_status(Status(StatusCode.ERROR, error))
    generate.end(end_time=ns(timeline.wall(end)))


@dataclass(slots=True)
class RequestTelemetry:
    """One attempt, as this worker observes it."""

    timeline: RequestTimeline
    log_fields: dict[str, str | int]
    trace_parent: Context | None = None
    finish_reason: str | None = None

    def log_context(self) -> AbstractContextManager:
        return structlog.contextvars.bound_contextvars(**self.log_fields)


class WorkerTelemetry:
    """Meters, tracer and log context of one worker."""

    def __init__(self, worker_id: str, model: str, tracer: Tracer | None = None):
        self.worker_id = worker_id
        self.model = model
        self.tracer = tracer
        self.meters = WorkerMeters()

    def log_fields(
        self,
        request: GenerateRequest | EmbedRequest,
        headers: Mapping[str, str] | None,
    ) -> dict[str, str | int]:
        fields: dict[str, str | int] = {
            "request_id": request.request_id,
            "model": request.model,
            "worker_id": self.worker_id,
        }
        if request.attempt > 1:
            fields["attempt"] = request.attempt
        trace_id = trace_id_of(extract_context(headers))
        if trace_id is not None:
            fields["trace_id"] = trace_id
        return fields

    def log_context(
        self, request: GenerateRequest | EmbedRequest, headers: Mapping[str, str] | None
    ) -> AbstractContextManager:
        """For lines logged while a queued request is looked at, before it is accepted."""
        return structlog.contextvars.bound_contextvars(**self.log_fields(request, headers))

    def accepted(
        self, request: GenerateRequest | EmbedRequest, published_at: float, headers: Mapping[str, str] | None
    ) -> RequestTelemetry:
        telemetry = RequestTelemetry(
            RequestTimeline(published_at), self.log_fields(request, headers), extract_context(headers)
        )
        constraint = getattr(request, "constraint", None)  # generate requests only
        self.meters.accepted(telemetry.timeline, None if constraint is None else constraint.type)
        return telemetry

    def output(self, telemetry: RequestTelemetry, output: RequestOutput) -> None:
        if any(choice.token_ids for choice in output.choices):
            self.meters.tokens(telemetry.timeline)
        if telemetry.finish_reason is None:
            reasons = [(c.index, c.finish_reason) for c in output.choices if c.finish_reason is not None]
            if reasons:
                telemetry.finish_reason = min(reasons)[1].value  # choice 0's when it is among them

    def finished(self, telemetry: RequestTelemetry, usage: Usage, default_reason: str = "stop") -> None:
        reason = telemetry.finish_reason or default_reason
        timeline = telemetry.timeline
        self.meters.finished(timeline, usage, reason)
        self._spans(
            telemetry,
            {
                "inferq.finish_reason": reason,
                "inferq.prompt_tokens": usage.prompt_tokens,
                "inferq.completion_tokens": usage.completion_tokens,
            },
        )
        first = timeline.first_token_mono
        log.info(
            "request.finished",
            finish_reason=reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            queue_s=round(timeline.queue_time, 4),
            ttft_s=None if first is None else round(timeline.since_publish(first), 4),
            e2e_s=round(timeline.since_publish(timeline.finished_mono or time.monotonic()), 4),
        )

    def failed(self, telemetry: RequestTelemetry, message: str) -> None:
        telemetry.timeline.finished_mono = time.monotonic()
        self._spans(telemetry, {}, error=message)
        log.warning("request.failed", error=message)

    def _spans(self, telemetry: RequestTelemetry, attributes: dict, error: str | None = None) -> None:
        if self.tracer is None:
            return
        attributes = {
            f"inferq.{key}": value for key, value in telemetry.log_fields.items() if key != "trace_id"
        } | attributes
        record_spans(self.tracer, telemetry.trace_parent, telemetry.timeline, attributes, error)

    def snapshot(self, stats: EngineStats) -> WorkerMetrics:
        return self.meters.snapshot(self.worker_id, self.model, stats)
