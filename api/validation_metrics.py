"""`inferq:structured_validation_seconds`: how long this edge took to validate a structured-output constraint
before queueing it (api/structured.py; issue #16 targets p99 < 20 ms), from the request's side: the hop to the
worker thread included. One meter per app, built in the lifespan; `GET /metrics` renders it next to the fleet's
series, labelled with this replica's edge id (each replica reports its own). With it, how often a constraint was
found among those this edge already validated (api/structured.py `StructuredValidation`), which costs no compile:
`inferq:structured_validation_cache_lookups_total{edge_id,result=hit|miss}`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, Metric

VALIDATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class ValidationMeter:
    def __init__(self, edge_id: str) -> None:
        # registry=None: not in prometheus_client's process-global registry; each scrape registers it in its own.
        self._histogram = Histogram(
            "inferq:structured_validation_seconds",
            "Time this edge took to validate a structured-output constraint before queueing, in seconds.",
            labelnames=("edge_id",),
            buckets=VALIDATION_BUCKETS,
            registry=None,
        )
        self._child = self._histogram.labels(edge_id)
        self._edge_id = edge_id
        self.hits = 0
        self.misses = 0

    def observe(self, seconds: float) -> None:
        self._child.observe(seconds)

    def count_lookups(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def collect(self) -> Iterator[Metric]:
        yield from self._histogram.collect()
        lookups = CounterMetricFamily(
            "inferq:structured_validation_cache_lookups",
            "Constraints this edge looked up among those it already validated, by result (hit: no compile).",
            labels=["edge_id", "result"],
        )
        lookups.add_metric([self._edge_id, "hit"], self.hits)
        lookups.add_metric([self._edge_id, "miss"], self.misses)
        yield lookups
