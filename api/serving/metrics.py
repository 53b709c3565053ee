"""`GET /metrics`: the whole fleet in the Prometheus text format, from any API replica. Each scrape asks every
live worker for its snapshot over NATS and JetStream for the queues' backlog (broker/metrics.py), then renders
them with prometheus_client through a registry made for that scrape (no process-global registry, and two
concurrent scrapes never share state). Names follow vLLM's, with our own `inferq:` prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from api.catalog import ModelCatalog
from api.errors import ApiError
from api.serving.supervision_metrics import SupervisorCollector, read_supervisor_status
from broker.metrics import QueueBacklog, queue_backlogs, scrape_workers
from contracts import ErrorCode, FinishReason
from contracts.constraints import CONSTRAINT_TYPES
from contracts.metrics import HistogramSnapshot, WorkerMetrics
from contracts.supervision import SupervisorStatus

PREFIX = "inferq:"
WORKER_LABELS = ["model_name", "worker_id"]
# Reported as 0 until they happen, so rate() sees the first increment.
FINISH_REASONS = (FinishReason.STOP.value, FinishReason.LENGTH.value, FinishReason.ABORT.value)

_HISTOGRAMS = (
    ("time_to_first_token_seconds", "Time from queueing a request to its first token, in seconds."),
    ("inter_token_latency_seconds", "Time between two token deliveries of a request, in seconds."),
    ("e2e_request_latency_seconds", "Time from queueing a request to its end, in seconds."),
    ("request_queue_time_seconds", "Time a request waited in the queue before a worker accepted it, in seconds."),
)


@dataclass(frozen=True, slots=True)
class FleetMetrics:
    nc: NatsClient
    js: JetStreamContext
    catalog: ModelCatalog
    scrape_timeout_s: float
    supervisor_status_file: Path | None = None  # set when `inferq serve` runs us
    edge_collectors: tuple[Collector, ...] = ()  # this edge's own series: affinity routing, constraint validation

    async def exposition(self) -> bytes:
        workers, backlogs = await self.scrape(len(await self.catalog.workers()))
        return render(workers, backlogs, read_supervisor_status(self.supervisor_status_file), *self.edge_collectors)

    async def scrape(self, expected: int) -> tuple[list[WorkerMetrics], list[QueueBacklog]]:
        """Every live worker's snapshot and every queue's backlog; `expected`: the registry's count of live workers
        (answers beyond this many are not waited for). Also read by the console's status (api/serving/cluster.py)."""
        try:
            return await asyncio.gather(
                scrape_workers(self.nc, expected, self.scrape_timeout_s), queue_backlogs(self.js)
            )
        except (nats.errors.Error, TimeoutError) as exc:  # JetStream errors are nats.errors.Error too
            raise ApiError(ErrorCode.UNAVAILABLE, f"NATS did not answer the scrape: {exc}", retry_after=1.0) from exc


def render(
    workers: list[WorkerMetrics],
    backlogs: list[QueueBacklog],
    supervisor: SupervisorStatus | None = None,
    *edge_collectors: Collector,
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FleetCollector(workers, backlogs))
    if supervisor is not None:
        registry.register(SupervisorCollector(supervisor))
    for collector in edge_collectors:
        registry.register(collector)
    return generate_latest(registry)


class _FleetCollector:
    def __init__(self, workers: list[WorkerMetrics], backlogs: list[QueueBacklog]):
        self.workers = workers
        self.backlogs = backlogs

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            f"{PREFIX}num_requests_running", "Requests a worker's engine is computing.", labels=WORKER_LABELS
        )
        kv = GaugeMetricFamily(
            f"{PREFIX}kv_cache_usage_perc", "Fraction of a worker's KV cache in use (0..1).", labels=WORKER_LABELS
        )
        preemptions = CounterMetricFamily(
            f"{PREFIX}num_preemptions", "Sequences preempted for lack of KV cache.", labels=WORKER_LABELS
        )
        drafts = CounterMetricFamily(
            f"{PREFIX}spec_decode_num_draft_tokens",
            "Draft tokens checked by speculative decoding.",
            labels=WORKER_LABELS,
        )
        accepted = CounterMetricFamily(
            f"{PREFIX}spec_decode_num_accepted_tokens",
            "Draft tokens accepted (they matched what the model sampled).",
            labels=WORKER_LABELS,
        )
        cache_queries = CounterMetricFamily(
            f"{PREFIX}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=WORKER_LABELS
        )
        cache_hits = CounterMetricFamily(
            f"{PREFIX}prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=WORKER_LABELS
        )
        prompt = CounterMetricFamily(
            f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests.", labels=WORKER_LABELS
        )
        generation = CounterMetricFamily(
            f"{PREFIX}generation_tokens", "Generated tokens of finished requests.", labels=WORKER_LABELS
        )
        success = CounterMetricFamily(
            f"{PREFIX}request_success",
            "Finished requests, by finish reason.",
            labels=[*WORKER_LABELS, "finished_reason"],
        )
        structured = CounterMetricFamily(
            f"{PREFIX}structured_requests",
            "Requests accepted with a structured-output constraint, by its kind.",
            labels=[*WORKER_LABELS, "kind"],
        )
        histograms = {
            name: HistogramMetricFamily(f"{PREFIX}{name}", text, labels=WORKER_LABELS) for name, text in _HISTOGRAMS
        }
        for worker in self.workers:
            labels = [worker.model, worker.worker_id]
            running.add_metric(labels, worker.num_requests_running)
            if worker.kv_cache_usage_perc is not None:
                kv.add_metric(labels, worker.kv_cache_usage_perc)
            if worker.num_preemptions_total is not None:
                preemptions.add_metric(labels, worker.num_preemptions_total)
            if worker.spec_decode_num_draft_tokens_total is not None:
                drafts.add_metric(labels, worker.spec_decode_num_draft_tokens_total)
                accepted.add_metric(labels, worker.spec_decode_num_accepted_tokens_total or 0)
            if worker.prefix_cache_queries_total is not None:
                cache_queries.add_metric(labels, worker.prefix_cache_queries_total)
                cache_hits.add_metric(labels, worker.prefix_cache_hits_total or 0)
            prompt.add_metric(labels, worker.prompt_tokens_total)
            generation.add_metric(labels, worker.generation_tokens_total)
            for reason, count in sorted({**dict.fromkeys(FINISH_REASONS, 0), **worker.request_success_total}.items()):
                success.add_metric([*labels, reason], count)
            for kind, count in sorted(
                {**dict.fromkeys(CONSTRAINT_TYPES, 0), **worker.structured_requests_total}.items()
            ):
                structured.add_metric([*labels, kind], count)
            for name, family in histograms.items():
                snapshot: HistogramSnapshot = getattr(worker, name)
                family.add_metric(labels, _cumulative_buckets(snapshot), sum_value=snapshot.sum)
        yield running
        yield self._waiting()
        yield kv
        yield preemptions
        yield drafts
        yield accepted
        yield cache_queries
        yield cache_hits
        yield prompt
        yield generation
        yield success
        yield structured
        yield from histograms.values()

    def _waiting(self) -> Metric:
        """One family, three places to wait, told apart by `lane`: the model's two queues (JetStream: not yet
        delivered plus delivered but not yet accepted) and, per worker, admitted but not yet scheduled."""
        waiting = Metric(
            f"{PREFIX}num_requests_waiting",
            "Requests waiting: in the model's queue (lane interactive or batch) or inside a worker (lane worker).",
            "gauge",
        )
        for backlog in self.backlogs:
            waiting.add_sample(waiting.name, {"model_name": backlog.model, "lane": backlog.lane.value}, backlog.waiting)
        for worker in self.workers:
            waiting.add_sample(
                waiting.name,
                {"model_name": worker.model, "worker_id": worker.worker_id, "lane": "worker"},
                worker.num_requests_waiting,
            )
        return waiting


def _cumulative_buckets(snapshot: HistogramSnapshot) -> list[tuple[str, int]]:
    buckets, total = [], 0
    for bound, count in zip([*map(_bound_text, snapshot.bounds), "+Inf"], snapshot.counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def _bound_text(bound: float) -> str:
    return repr(float(bound))  # 0.5 → "0.5", 1 → "1.0", as prometheus_client writes its own bounds
