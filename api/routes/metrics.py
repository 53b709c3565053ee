"""`GET /metrics`: Prometheus text for the whole fleet, and `GET /metrics/cluster`: the same numbers as JSON for
the web console (monitor and admin roles when auth is on, for both)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from api.serving.cluster import cluster_status

router = APIRouter(tags=["system"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Every live worker's counters, histograms and gauges, and every model's queue backlog (docs/api.md)."""
    body = await request.app.state.fleet_metrics.exposition()
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


@router.get("/metrics/cluster")
async def cluster(request: Request) -> dict:
    """Workers (registry and counters), queue backlogs and this edge's NATS connection; counters are cumulative."""
    return await cluster_status(request.app.state.fleet_metrics)
