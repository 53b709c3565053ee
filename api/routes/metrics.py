"""`GET /metrics`: Prometheus text for the whole fleet (monitor and admin roles when auth is on)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

router = APIRouter(tags=["system"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Every live worker's counters, histograms and gauges, and every model's queue backlog (docs/api.md)."""
    body = await request.app.state.fleet_metrics.exposition()
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)
