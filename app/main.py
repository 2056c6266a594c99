"""Build the FastAPI app: `create_app(settings)`.

The lifespan starts loading the active model in the background (so /healthz answers at once and
/readyz says "loading ..." until it is in), follows the shared active pointer for as long as the
app runs (app/reconcile.py: hot swap on every replica, whatever routers are mounted), and stops
every engine at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import torch
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

import lm
from app.auth import warn_if_open
from app.bodies import check_media_type
from app.engine import Admission
from app.errors import BodyLimit, BodyLimitMiddleware, install_error_handlers
from app.generation import client_limits
from app.holder import ModelHolder
from app.logging import RequestLogMiddleware
from app.metrics import Metrics, RequestMetricsMiddleware
from app.reconcile import RedisHealth, following
from app.routes import aliases, files, fine_tuning, generate, health, models, openai, tokenize, train, ui
from app.settings import Settings
from app.training import Training
from jobs.store import Backend, backend_from_settings
from lm.registry import Registry

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    holder: ModelHolder = app.state.holder
    warn_if_open(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    backend: Backend = app.state.backend
    loading = asyncio.create_task(holder.load_initial())
    app.state.loading = loading
    try:
        async with following(holder, backend, app.state.redis_health, settings) as reconciler:
            app.state.reconciler = reconciler
            yield
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await holder.close()
        backend.close()


async def client_gone(request: object, exc: Exception) -> Response:
    """The client left before its answer was ready: nobody reads this response."""
    return Response(status_code=499)


def body_limit(settings: Settings) -> BodyLimit:
    """Every route's body limit but POST /train's (app/routes/train.py: `body_limit`)."""
    limit = settings.max_body_bytes
    return BodyLimit(limit, f"the request body is larger than TEXTGEN_MAX_BODY_BYTES={limit} bytes")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    app = FastAPI(
        title="textgen",
        version=lm.__version__,
        summary="Train and serve LSTM language models",
        lifespan=lifespan,
        dependencies=[Depends(check_media_type)],  # 415 for a body its route does not read (app/bodies.py)
    )
    backend = backend_from_settings(settings)  # job store and active pointer: Redis, or the models folder
    registry = Registry(settings.models_dir, backend.pointer)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.backend = backend
    app.state.redis_health = RedisHealth(backend)
    app.state.holder = ModelHolder(settings, metrics, registry=registry, aliases=backend.aliases)
    app.state.training = Training(settings, backend, registry)
    app.state.admission = Admission(settings.max_running, settings.max_waiting)
    app.state.key_limits = client_limits(settings)  # per API key, or per client address without keys

    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_middleware(
        BodyLimitMiddleware,
        default=body_limit(settings),
        routes={("POST", "/train"): train.body_limit(settings), ("POST", "/v1/files"): files.body_limit(settings)},
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Route-Key"],
            expose_headers=["X-Model-Version", "X-Model-Alias", "X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestLogMiddleware)  # added last = outermost: it sees every response

    routers = (generate.router, openai.router, tokenize.router, aliases.router, models.router, health.router)
    for router in (*routers, train.router, files.router, fine_tuning.router):
        app.include_router(router)
    app.include_router(ui.router)  # the playground page at /
    return app
