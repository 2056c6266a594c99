"""Liveness, readiness and Prometheus metrics; open without a key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.deps import HolderDep, MetricsDep
from app.errors import ApiError
from app.schemas import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus)
async def healthz() -> HealthStatus:
    """The process is alive."""
    return HealthStatus(status="ok")


@router.get("/readyz", response_model=ReadyStatus, responses={503: {"description": "no model loaded, and why"}})
async def readyz(holder: HolderDep) -> ReadyStatus | JSONResponse:
    """Ready once a model is loaded; 503 with the reason until then."""
    if holder.active is None:
        error = ApiError(503, f"not ready: {holder.not_ready_reason}", code="model_not_ready")
        return JSONResponse(error.body(), status_code=503)
    return ReadyStatus(status="ready", model=holder.active.model_id)


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of the textgen_* metrics."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
