"""`inferq serve`'s process restarts on `/metrics`, from the status record its supervisor keeps in a file
(contracts/supervision.py). Read at every scrape: the file is small, and a restarted api sees the counts from
before its own restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import ValidationError

from contracts.supervision import ProcessState, SupervisorStatus

log = structlog.get_logger(__name__)

PREFIX = "inferq:"


def read_supervisor_status(path: Path | None) -> SupervisorStatus | None:
    """The record, or None when not run by `inferq serve` (no path) or the file is missing or unreadable."""
    if path is None:
        return None
    try:
        return SupervisorStatus.from_bytes(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:  # only this part of the scrape is lost
        log.warning("metrics.supervisor_status_unreadable", path=str(path), error=str(exc))
        return None


class SupervisorCollector:
    def __init__(self, status: SupervisorStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            f"{PREFIX}process_restarts", "Times `inferq serve` restarted a crashed process.", labels=["process"]
        )
        up = GaugeMetricFamily(
            f"{PREFIX}process_up",
            "1 while a supervised process runs; 0 while it waits out "
            "its restart backoff or was given up after a crash loop.",
            labels=["process"],
        )
        gave_up = GaugeMetricFamily(
            f"{PREFIX}process_given_up",
            "1 if `inferq serve` stopped restarting the process (crash loop).",
            labels=["process"],
        )
        for process in self.status.processes:
            restarts.add_metric([process.name], process.restarts)
            up.add_metric([process.name], 1 if process.state is ProcessState.RUNNING else 0)
            gave_up.add_metric([process.name], 1 if process.state is ProcessState.GAVE_UP else 0)
        yield restarts
        yield up
        yield gave_up
