"""`Annotated[..., Depends(...)]` aliases: what a route needs, taken from the app's state.

`create_app()` puts one of each on `app.state`; tests build an app with their own `Settings`
(or override these dependencies) instead of patching modules.

They are coroutines on purpose: FastAPI runs a plain `def` dependency in its thread pool, a round trip
through a worker thread (and the GIL, shared with the engine's threads) per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import Admission
from app.holder import ModelHolder
from app.metrics import Metrics
from app.reconcile import RedisHealth
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_admission(request: Request) -> Admission:
    return request.app.state.admission


async def get_redis_health(request: Request) -> RedisHealth:
    return request.app.state.redis_health


SettingsDep = Annotated[Settings, Depends(get_settings)]
HolderDep = Annotated[ModelHolder, Depends(get_holder)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
RedisHealthDep = Annotated[RedisHealth, Depends(get_redis_health)]
