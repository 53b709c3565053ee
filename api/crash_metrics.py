"""`inferq:worker_crashed_requests_total{edge_id}`: requests this edge's max-deliveries watcher answered with a
`worker_crashed` error, because their workers died `max_deliver` times running them (broker/max_deliveries.py).
Each replica reports its own; the fleet's total is their sum."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from broker.max_deliveries import MaxDeliveriesWatcher


class WorkerCrashMeter:
    def __init__(self, edge_id: str, watcher: MaxDeliveriesWatcher) -> None:
        self._edge_id = edge_id
        self._watcher = watcher

    def collect(self) -> Iterator[Metric]:
        answered = CounterMetricFamily(
            "inferq:worker_crashed_requests",
            "Requests this edge answered with worker_crashed: their workers died max_deliver times running them.",
            labels=["edge_id"],
        )
        answered.add_metric([self._edge_id], self._watcher.answered)
        yield answered
