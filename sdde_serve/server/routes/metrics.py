"""``GET /metrics``: Prometheus text format (open, like the health endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdde_serve.server.deps import MetricsDep
from sdde_serve.server.live_window import merged_live_families
from sdde_serve.server.multiprocess import collect

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(m: MetricsDep) -> Response:
    if m.multiprocess_dir is not None:  # --workers N: every worker's samples, merged
        text = collect(m.multiprocess_dir, merged_live_families)
        return Response(text, media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
