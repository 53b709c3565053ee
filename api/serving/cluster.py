"""`GET /metrics/cluster`: the fleet as JSON for the web console's Cluster page. The same sources as `/metrics`
(one scrape of every live worker over NATS, the queues' backlog from JetStream) joined with the worker registry
(device, slots, last heartbeat), plus this edge's NATS connection. Counters stay cumulative, as in `/metrics`:
the page turns two polls into rates (tokens/s, requests/s, mean TTFT), exactly as `rate()` would."""

from __future__ import annotations

import time

from nats.aio.client import Client as NatsClient

from api.errors import ApiError, as_api_error
from api.serving.metrics import FleetMetrics
from broker.errors import BrokerError
from broker.metrics import QueueBacklog
from contracts.metrics import WorkerMetrics
from contracts.workers import WorkerInfo


async def cluster_status(fleet: FleetMetrics) -> dict:
    """Answers even while NATS is away (then with `error` set and no workers), so the page can say so."""
    error = None
    try:
        registered = await fleet.catalog.workers()
        scraped, backlogs = await fleet.scrape(len(registered))
    except (ApiError, BrokerError) as exc:
        registered, scraped, backlogs = [], [], []
        error = as_api_error(exc).info.message
    metrics = {snapshot.worker_id: snapshot for snapshot in scraped}
    return {
        "object": "cluster.status",
        "time": time.time(),
        "nats": nats_state(fleet.nc),
        "error": error,
        "workers": [
            worker_view(info, metrics.get(info.worker_id))
            for info in sorted(registered, key=lambda w: (w.model, w.worker_id))
        ],
        "queues": [queue_view(backlog) for backlog in backlogs],
    }


def nats_state(nc: NatsClient) -> dict:
    state = (
        "connected"
        if nc.is_connected
        else "reconnecting"
        if nc.is_reconnecting
        else "closed"
        if nc.is_closed
        else "disconnected"
    )
    url = nc.connected_url
    return {
        "state": state,
        "server": f"{url.hostname}:{url.port}" if url else None,
        "reconnects": nc.stats.get("reconnects", 0),
    }


def worker_view(info: WorkerInfo, metrics: WorkerMetrics | None) -> dict:
    """The registry's view, and the worker's counters when it answered this scrape (None: it did not)."""
    view = {
        "worker_id": info.worker_id,
        "model": info.model,
        "host": info.host,
        "pid": info.pid,
        "device": (
            info.device.name
            if info.device.index is None
            else f"{info.device.kind}:{info.device.index} {info.device.name}"
        ),
        "device_kind": info.device.kind,
        "dtype": info.dtype,
        "capacity": info.capacity,
        "running": info.running,
        "waiting": info.waiting,
        "free": max(info.capacity - info.running, 0),
        "started_at": info.started_at,
        "last_heartbeat": info.updated_at,
        "metrics": None,
    }
    if metrics is not None:
        ttft = metrics.time_to_first_token_seconds
        view["running"] = metrics.num_requests_running  # fresher than the last heartbeat
        view["free"] = max(info.capacity - metrics.num_requests_running, 0)
        view["metrics"] = {
            "sent_at": metrics.sent_at,
            "generation_tokens_total": metrics.generation_tokens_total,
            "prompt_tokens_total": metrics.prompt_tokens_total,
            "requests_total": sum(metrics.request_success_total.values()),
            "ttft_sum": ttft.sum,
            "ttft_count": ttft.count,
            "kv_cache_usage_perc": metrics.kv_cache_usage_perc,
        }
    return view


def queue_view(backlog: QueueBacklog) -> dict:
    return {"model": backlog.model, "lane": backlog.lane.value, "waiting": backlog.waiting}
