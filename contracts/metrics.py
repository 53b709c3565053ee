"""What a worker reports about itself when an edge scrapes the fleet (`inf.metrics.scrape`, see
docs/nats-protocol.md): cumulative counters and histograms since the worker started, and its gauges now. Plain
numbers, so a worker needs no Prometheus library; the edge renders them as `inferq:*` series."""

from __future__ import annotations

from pydantic import Field, model_validator

from contracts.base import SCHEMA_VERSION, Contract


class HistogramSnapshot(Contract):
    """Observations per bucket: `counts[i]` holds values <= `bounds[i]` (and above the bound before it); the last
    count, one past the bounds, holds values above every bound (the `+Inf` bucket). Not cumulative."""

    bounds: list[float] = Field(description="Upper bounds, ascending, without +Inf.")
    counts: list[int] = Field(description="len(bounds) + 1 per-bucket counts; the last is the overflow.")
    sum: float = 0.0

    @model_validator(mode="after")
    def _one_count_per_bucket(self) -> HistogramSnapshot:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.bounds)} bounds need {len(self.bounds) + 1} counts, got {len(self.counts)}")
        return self

    @property
    def count(self) -> int:
        return sum(self.counts)


class WorkerMetrics(Contract):
    """One worker's answer to a scrape. Counters and histograms only grow while the worker lives (a restarted
    worker has a new `worker_id`); gauges are the value at `sent_at`."""

    v: int = SCHEMA_VERSION
    worker_id: str
    model: str
    sent_at: float = Field(description="Unix time of the snapshot.")
    # gauges
    num_requests_running: int = Field(description="Requests the engine is computing now.")
    num_requests_waiting: int = Field(
        description="Requests admitted by this worker but not yet scheduled "
        "(or preempted); the queue's backlog is the edge's to count."
    )
    kv_cache_usage_perc: float | None = Field(default=None, description="Fraction 0..1; None: no KV cache.")
    # counters
    num_preemptions_total: int | None = Field(default=None, description="None: the engine never preempts.")
    spec_decode_num_draft_tokens_total: int | None = Field(
        default=None, description="Draft tokens checked by speculative decoding; None: the engine never drafts."
    )
    spec_decode_num_accepted_tokens_total: int | None = Field(
        default=None, description="Draft tokens that matched what the model sampled (kept in the output)."
    )
    prefix_cache_queries_total: int | None = Field(
        default=None, description="Prompt tokens looked up in the prefix cache; None: no prefix cache."
    )
    prefix_cache_hits_total: int | None = Field(
        default=None, description="Prompt tokens found in the prefix cache (their KV was reused)."
    )
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    request_success_total: dict[str, int] = Field(default_factory=dict, description="By finish reason.")
    structured_requests_total: dict[str, int] = Field(
        default_factory=dict,
        description="Accepted requests with a structured-output constraint, by its type (json_schema, json_object, "
        "regex, choice, grammar); a resumed request counts once per attempt.",
    )
    # histograms (seconds)
    time_to_first_token_seconds: HistogramSnapshot
    inter_token_latency_seconds: HistogramSnapshot
    e2e_request_latency_seconds: HistogramSnapshot
    request_queue_time_seconds: HistogramSnapshot
