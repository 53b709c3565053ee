"""How worker snapshots and queue backlogs become Prometheus text: names, labels, cumulative buckets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from api.serving.metrics import render
from broker.metrics import QueueBacklog
from broker.work_queue import Lane
from contracts.metrics import HistogramSnapshot, WorkerMetrics


def _histogram(counts: list[int], total: float) -> HistogramSnapshot:
    return HistogramSnapshot(bounds=[0.1, 1.0], counts=counts, sum=total)


def _worker(worker_id: str, **fields) -> WorkerMetrics:
    defaults = {
        "model": "m",
        "sent_at": 0.0,
        "num_requests_running": 2,
        "num_requests_waiting": 1,
        "prompt_tokens_total": 30,
        "generation_tokens_total": 12,
        "request_success_total": {"length": 3},
        "time_to_first_token_seconds": _histogram([1, 2, 0], 1.7),
        "inter_token_latency_seconds": _histogram([9, 0, 0], 0.2),
        "e2e_request_latency_seconds": _histogram([0, 1, 2], 9.0),
        "request_queue_time_seconds": _histogram([3, 0, 0], 0.01),
    }
    return WorkerMetrics(worker_id=worker_id, **{**defaults, **fields})


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_fleet_exposition() -> None:
    workers = [
        _worker(
            "w1",
            kv_cache_usage_perc=0.5,
            num_preemptions_total=4,
            spec_decode_num_draft_tokens_total=50,
            spec_decode_num_accepted_tokens_total=35,
            prefix_cache_queries_total=900,
            prefix_cache_hits_total=640,
            structured_requests_total={"json_schema": 5, "regex": 1},
        ),
        _worker("w2"),
    ]
    text = render(workers, [QueueBacklog("m", Lane.INTERACTIVE, 7), QueueBacklog("m", Lane.BATCH, 0)]).decode()
    samples = _samples(text)
    w1 = {("model_name", "m"), ("worker_id", "w1")}

    def value(name: str, labels: set) -> float:
        return samples[(name, frozenset(labels))]

    assert value("inferq:generation_tokens_total", w1) == 12
    assert value("inferq:prompt_tokens_total", w1) == 30
    assert value("inferq:request_success_total", w1 | {("finished_reason", "length")}) == 3
    assert value("inferq:request_success_total", w1 | {("finished_reason", "stop")}) == 0  # present from the start
    assert value("inferq:structured_requests_total", w1 | {("kind", "json_schema")}) == 5
    assert value("inferq:structured_requests_total", w1 | {("kind", "regex")}) == 1
    assert value("inferq:structured_requests_total", w1 | {("kind", "grammar")}) == 0  # present from the start
    assert value("inferq:num_requests_running", w1) == 2
    assert value("inferq:kv_cache_usage_perc", w1) == 0.5
    assert value("inferq:num_preemptions_total", w1) == 4
    assert value("inferq:spec_decode_num_draft_tokens_total", w1) == 50
    assert value("inferq:spec_decode_num_accepted_tokens_total", w1) == 35
    assert value("inferq:prefix_cache_queries_total", w1) == 900
    assert value("inferq:prefix_cache_hits_total", w1) == 640
    # The sim-like worker without a KV cache has no such series.
    assert ("inferq:kv_cache_usage_perc", frozenset({("model_name", "m"), ("worker_id", "w2")})) not in samples
    assert (
        "inferq:spec_decode_num_draft_tokens_total",
        frozenset({("model_name", "m"), ("worker_id", "w2")}),
    ) not in samples
    assert ("inferq:prefix_cache_hits_total", frozenset({("model_name", "m"), ("worker_id", "w2")})) not in samples
    # Buckets are cumulative and end at +Inf = count.
    assert value("inferq:time_to_first_token_seconds_bucket", w1 | {("le", "0.1")}) == 1
    assert value("inferq:time_to_first_token_seconds_bucket", w1 | {("le", "1.0")}) == 3
    assert value("inferq:time_to_first_token_seconds_bucket", w1 | {("le", "+Inf")}) == 3
    assert value("inferq:time_to_first_token_seconds_count", w1) == 3
    assert value("inferq:e2e_request_latency_seconds_sum", w1) == 9.0
    # Waiting: the queue lanes per model, and per worker.
    assert value("inferq:num_requests_waiting", {("model_name", "m"), ("lane", "interactive")}) == 7
    assert value("inferq:num_requests_waiting", {("model_name", "m"), ("lane", "batch")}) == 0
    assert value("inferq:num_requests_waiting", w1 | {("lane", "worker")}) == 1
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert f"# TYPE inferq:{name} histogram" in text
    assert "# TYPE inferq:generation_tokens_total counter" in text


def test_an_empty_fleet_still_renders() -> None:
    text = render([], []).decode()
    assert "# TYPE inferq:num_requests_running gauge" in text
    assert not [s for family in text_string_to_metric_families(text) for s in family.samples]
