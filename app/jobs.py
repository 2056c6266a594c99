"""The service's side of training jobs: the job store, the shared active pointer, the local worker.

One `JobService` per app, built by `create_app()` from the settings:

- Redis mode (`TEXTGEN_REDIS_URL` set): jobs go to the Redis queue, and `textgen worker`
  processes (any number, any host) run them; the active pointer is the Redis key.
- Embedded mode: jobs are files under models/jobs/, run by one local worker process
  (`python -m worker.local`) that this service starts when there is a job to run, and stops
  at shutdown; the active pointer is models/ACTIVE. Nothing here imports worker/: the two
  meet through lm/ and the models folder.

The lifespan below (merged into the app's by the train router) runs the reconcile loop that
keeps this replica on the model the pointer names (app/reconcile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from app.errors import ApiError, error_response
from app.reconcile import Reconciler
from app.settings import Settings
from lm.job_files import FileStore
from lm.job_redis import RedisStore, connect_redis
from lm.jobs import JobStore, StoreUnavailable
from lm.redis_pointer import RedisPointer
from lm.registry import ActivePointer, FilePointer, Registry

log = logging.getLogger(__name__)

LOCAL_WORKER_GRACE_S = 15.0


class JobService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Any = None
        inner: ActivePointer
        self.store: JobStore
        if settings.redis_url:
            self.redis = connect_redis(settings.redis_url)
            self.store = RedisStore(
                self.redis, settings.models_dir, prefix=settings.redis_prefix, lease_s=settings.job_lease_s
            )
            inner = RedisPointer(self.redis, prefix=settings.redis_prefix)
        else:
            self.store = FileStore(settings.models_dir, lease_s=settings.job_lease_s)
            inner = FilePointer(settings.models_dir)
        self.pointer = inner
        self.registry = Registry(settings.models_dir, self.pointer)  # the holder's registry too
        self.local_worker: subprocess.Popen[bytes] | None = None
        self.redis_up: bool | None = None  # None: not checked yet; always None in embedded mode

    @property
    def mode(self) -> str:
        return "redis" if self.redis is not None else "embedded"

    @property
    def redis_status(self) -> Literal["up", "down"] | None:
        """ "up" or "down" as last seen (None in embedded mode); /readyz reports it."""
        if self.redis is None:
            return None
        return "up" if self.redis_up else "down"

    async def check_redis(self) -> bool | None:
        """Ping Redis (Redis mode only) and remember the answer for /readyz."""
        if self.redis is None:
            return None
        try:
            await asyncio.to_thread(self.store.ping)
            self.redis_up = True
        except StoreUnavailable:
            self.redis_up = False
        return self.redis_up

    # -- the local worker of embedded mode

    def ensure_local_worker(self) -> None:
        """Start the local worker if it is not running (embedded mode only)."""
        if self.redis is not None or (self.local_worker is not None and self.local_worker.poll() is None):
            return
        command = [sys.executable, "-m", "worker.local", "--models-dir", str(self.settings.models_dir)]
        command += ["--parent-pid", str(os.getpid()), "--threads", str(self.settings.train_threads)]
        command += ["--lease", str(self.settings.job_lease_s), "--log-level", self.settings.log_level]
        self.local_worker = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        log.info("started the local training worker (pid %d)", self.local_worker.pid)

    def has_unfinished_jobs(self) -> bool:
        return any(r.state in ("queued", "running") for r in self.store.list_jobs(limit=1000))

    async def stop_local_worker(self) -> None:
        """SIGTERM: the running job saves nothing more, is handed back, and resumes at the next start."""
        proc, self.local_worker = self.local_worker, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, LOCAL_WORKER_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("the local training worker did not stop in %.0fs; killing it", LOCAL_WORKER_GRACE_S)
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]


@contextlib.asynccontextmanager
async def jobs_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the reconcile loop (and, with unfinished jobs in embedded mode, the local worker)."""
    service: JobService = app.state.jobs
    settings = service.settings
    if service.mode == "embedded" and await asyncio.to_thread(service.has_unfinished_jobs):
        service.ensure_local_worker()
    await service.check_redis()
    reconciler = Reconciler(
        app.state.holder,
        service.pointer,
        interval_s=settings.reconcile_s,
        redis_url=settings.redis_url,
        channel=f"{settings.redis_prefix}activated" if settings.redis_url else None,
    )
    app.state.reconciler = reconciler
    task = asyncio.create_task(_reconcile_forever(service, reconciler), name="reconcile-active-model")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await service.stop_local_worker()
        service.close()


async def _reconcile_forever(service: JobService, reconciler: Reconciler) -> None:
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(reconciler.run())
        if service.redis is not None:
            tasks.create_task(_watch_redis(service, reconciler.interval_s))


async def _watch_redis(service: JobService, interval_s: float) -> None:
    while True:
        was = service.redis_up
        now = await service.check_redis()
        if now != was:
            log.log(logging.INFO if now else logging.WARNING, "Redis is %s", "up" if now else "down")
        await asyncio.sleep(interval_s)


async def store_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """Redis is down: 503 with Retry-After; generation on the loaded model is not affected."""
    error = ApiError(503, str(exc), code="store_unavailable", headers={"Retry-After": "5"})
    return error_response(error, request.scope)


def install_job_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StoreUnavailable, store_unavailable_handler)
