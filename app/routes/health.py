"""Liveness, readiness and Prometheus metrics; open without a key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.deps import HolderDep, MetricsDep, RedisHealthDep
from app.errors import ApiError, error_response, error_responses
from app.schemas import HealthStatus, ReadyStatus
from lm.aliases import PRODUCTION

router = APIRouter(tags=["health"], responses=error_responses(500))


@router.get("/healthz", response_model=HealthStatus)
async def healthz() -> HealthStatus:
    """The process is alive."""
    return HealthStatus(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyStatus,
    response_model_exclude_none=True,
    responses=error_responses(503),
)
async def readyz(request: Request, holder: HolderDep, redis_health: RedisHealthDep) -> ReadyStatus | JSONResponse:
    """Ready once a model is loaded (503 with the reason until then); in Redis mode, whether Redis is up."""
    # as last seen: checked every TEXTGEN_RECONCILE_S, so a probe never waits on Redis
    redis = redis_health.status
    if holder.active is None:
        reason = holder.not_ready_reason + ("; Redis is down" if redis == "down" else "")
        error = ApiError(503, f"not ready: {reason}", code="model_not_ready")
        return error_response(error, request.scope)
    production = holder.aliases.get(PRODUCTION)
    canary = production.canary if production is not None else None
    canary_body = None if canary is None else {"model": canary.model, "weight": canary.weight}
    return ReadyStatus(status="ready", model=holder.active.model_id, canary=canary_body, redis=redis)


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of the textgen_* metrics."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
