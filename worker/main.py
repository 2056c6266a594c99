"""`textgen worker`: take training jobs from the Redis queue, on any host sharing Redis and the models folder.

Run as many as you like; each takes one job at a time. See docs/TRAINING.md.
"""

from __future__ import annotations

import logging

from jobs.settings import JobSettings
from jobs.store import backend_from_settings
from lm.errors import ConfigError
from worker.runner import Runner, RunnerConfig

log = logging.getLogger(__name__)


def run(
    settings: JobSettings,
    *,
    nice: int = 10,
    heartbeat_s: float | None = None,
    poll_s: float = 2.0,
    grace_s: float = 30.0,
    name: str | None = None,
    burst: bool = False,
) -> int:
    """Consume jobs until SIGTERM/SIGINT (or, with `burst`, until the queue is empty); returns 0.

    A job whose worker is silent for `settings.job_lease_s` seconds is taken over by another worker,
    which resumes it from its last saved epoch; `heartbeat_s` (default lease / 6) keeps ours alive.
    """
    if not settings.redis_url:
        raise ConfigError("textgen worker needs --redis-url or TEXTGEN_REDIS_URL (without Redis, serve runs jobs)")
    backend = backend_from_settings(settings)
    config = RunnerConfig(
        threads=settings.train_threads,
        nice=nice,
        heartbeat_s=heartbeat_s or max(0.2, settings.job_lease_s / 6),
        poll_s=poll_s,
        grace_s=grace_s,
        native=settings.native,
    )
    runner = Runner(backend.store, config, name=name)
    runner.install_signal_handlers()
    log.info("worker %s: queue %s, models in %s", runner.name, _safe_url(settings.redis_url), settings.models_dir)
    try:
        return runner.run(burst=burst)
    finally:
        backend.close()


def _safe_url(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
