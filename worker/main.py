"""`textgen worker`: take training jobs from the Redis queue, on any host sharing Redis and the models folder.

Run as many as you like; each takes one job at a time. See docs/TRAINING.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lm.job_redis import RedisStore, connect_redis
from lm.jobs import DEFAULT_LEASE_S
from worker.runner import Runner, RunnerConfig

log = logging.getLogger(__name__)


def run(
    redis_url: str,
    models_dir: Path | str,
    *,
    threads: int = 0,
    nice: int = 10,
    lease_s: float = DEFAULT_LEASE_S,
    heartbeat_s: float | None = None,
    poll_s: float = 2.0,
    grace_s: float = 30.0,
    prefix: str = "textgen:",
    name: str | None = None,
    burst: bool = False,
) -> int:
    """Consume jobs until SIGTERM/SIGINT (or, with `burst`, until the queue is empty); returns 0.

    A job whose worker is silent for `lease_s` seconds is taken over by another worker, which
    resumes it from its last saved epoch; `heartbeat_s` (default lease_s / 6) keeps ours alive.
    """
    store = RedisStore(connect_redis(redis_url), Path(models_dir), prefix=prefix, lease_s=lease_s)
    config = RunnerConfig(
        threads=threads,
        nice=nice,
        heartbeat_s=heartbeat_s or max(0.2, lease_s / 6),
        poll_s=poll_s,
        grace_s=grace_s,
    )
    runner = Runner(store, config, name=name)
    runner.install_signal_handlers()
    log.info("worker %s: queue %s, models in %s", runner.name, _safe_url(redis_url), models_dir)
    return runner.run(burst=burst)


def _safe_url(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
