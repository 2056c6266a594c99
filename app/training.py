"""The service's side of training jobs: the job store, and in embedded mode the local worker.

- Redis mode (`TEXTGEN_REDIS_URL` set): jobs go to the Redis queue, and `textgen worker`
  processes (any number, any host) run them.
- Embedded mode: jobs are files under models/jobs/, run by one local worker process
  (`python -m worker.local`) that this service starts when there is a job to run, and stops
  at shutdown. Nothing here imports worker/: the two meet through jobs/ and the models folder.

The training router's lifespan (`training_lifespan`) starts the local worker when unfinished jobs
wait, and stops it at shutdown. Following the active model is not the router's business: every
app does it (app/reconcile.py, started by `create_app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from app.settings import Settings
from jobs.store import Backend, JobStore
from lm.registry import Registry

log = logging.getLogger(__name__)

LOCAL_WORKER_GRACE_S = 15.0


class Training:
    def __init__(self, settings: Settings, backend: Backend, registry: Registry) -> None:
        self.settings = settings
        self.mode = backend.mode
        self.store: JobStore = backend.store
        self.registry = registry  # the holder's: where a job's base model and its name are checked
        self.local_worker: subprocess.Popen[bytes] | None = None

    def ensure_local_worker(self) -> None:
        """Start the local worker if it is not running (embedded mode only)."""
        if self.mode != "embedded" or (self.local_worker is not None and self.local_worker.poll() is None):
            return
        s = self.settings
        command = [sys.executable, "-m", "worker.local", "--models-dir", str(s.models_dir)]
        command += ["--parent-pid", str(os.getpid()), "--threads", str(s.train_threads)]
        command += ["--lease", str(s.job_lease_s), "--log-level", s.log_level]
        command += ["--native" if s.native else "--no-native"]
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


async def get_training(request: Request) -> Training:
    return request.app.state.training


TrainingDep = Annotated[Training, Depends(get_training)]


@contextlib.asynccontextmanager
async def training_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Embedded mode: start the local worker when jobs wait from an earlier run; stop it at shutdown."""
    training: Training = app.state.training
    if training.mode == "embedded" and await asyncio.to_thread(training.has_unfinished_jobs):
        training.ensure_local_worker()
    try:
        yield
    finally:
        await training.stop_local_worker()
