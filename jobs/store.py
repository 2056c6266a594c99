"""The `JobStore` interface, and `open_backend`: a deployment's job store and active pointer, together.

Embedded mode (no Redis URL): jobs are files under models/jobs/ (jobs/file_store.py) and the active
model pointer is the file models/ACTIVE. Redis mode: jobs live in Redis (jobs/redis_store.py), and
so does the pointer (jobs/pointer.py). Every process of a deployment (each API replica, each worker,
each job's training process) opens the same pair from the same settings, or from a store's `spec()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from jobs.aliases import RedisAliases
from jobs.file_store import FileStore
from jobs.pointer import RedisPointer
from jobs.records import DEFAULT_LEASE_S, Claim, JobEvent, JobRecord
from jobs.redis_client import DEFAULT_PREFIX, connect_redis
from jobs.redis_store import RedisStore
from jobs.settings import JobSettings
from lm.aliases import AliasStore, FileAliases
from lm.registry import ActivePointer, FilePointer


class JobStore(Protocol):
    """Where job records, events and the queue live. The API uses the first half, workers the second."""

    models_dir: Path

    # -- the API's side
    def submit(self, params: dict[str, Any], text: str, job_id: str | None = None) -> JobRecord: ...
    def get(self, job_id: str) -> JobRecord: ...
    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]: ...
    def cancel(self, job_id: str) -> JobRecord: ...
    def pause(self, job_id: str) -> JobRecord: ...
    def resume(self, job_id: str) -> JobRecord: ...
    def events(self, job_id: str, after: str | None = None, block_s: float = 0.0) -> list[JobEvent]: ...
    def queue_position(self, job_id: str) -> int | None: ...
    def remember_request(self, key: str, job_id: str) -> str: ...
    def forget_request(self, key: str, job_id: str) -> None: ...
    def ping(self) -> None: ...

    # -- the workers' side
    def claim(self, worker: str, block_s: float) -> Claim | None: ...
    def start(self, claim: Claim) -> JobRecord | None: ...
    def heartbeat(self, claim: Claim) -> bool: ...
    def update(self, job_id: str, **values: Any) -> None: ...
    def set_once(self, job_id: str, name: str, value: Any) -> Any: ...
    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str: ...
    def stop_requested(self, job_id: str) -> str | None: ...
    def finish(self, claim: Claim, state: str, **values: Any) -> bool: ...
    def mark_paused(self, claim: Claim) -> bool: ...
    def hand_back(self, claim: Claim, reason: str) -> bool: ...
    def release(self, worker: str) -> None: ...
    def spec(self) -> dict[str, Any]: ...


@dataclass
class Backend:
    """A deployment's job store, active pointer and aliases, and the Redis client behind them in Redis mode."""

    store: JobStore
    pointer: ActivePointer
    aliases: AliasStore
    redis: Any = None  # redis.Redis in Redis mode; None embedded

    @property
    def mode(self) -> Literal["redis", "embedded"]:
        return "redis" if self.redis is not None else "embedded"

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def open_backend(
    models_dir: Path | str,
    redis_url: str | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    lease_s: float = DEFAULT_LEASE_S,
) -> Backend:
    """Redis mode when `redis_url` is given, else embedded mode (files in the models folder)."""
    models_dir = Path(models_dir)
    if redis_url is None:
        return Backend(FileStore(models_dir, lease_s=lease_s), FilePointer(models_dir), FileAliases(models_dir))
    client = connect_redis(redis_url)
    store = RedisStore(client, models_dir, prefix=prefix, lease_s=lease_s)
    pointer = RedisPointer(client, prefix=prefix)
    return Backend(store, pointer, RedisAliases(client, pointer, prefix=prefix), client)


def backend_from_settings(settings: JobSettings) -> Backend:
    return open_backend(
        settings.models_dir, settings.redis_url, prefix=settings.redis_prefix, lease_s=settings.job_lease_s
    )


def backend_from_spec(spec: dict[str, Any]) -> Backend:
    """Rebuild a backend from `store.spec()` (how a worker hands its store to a job's child process)."""
    if spec["kind"] not in ("file", "redis"):
        raise ValueError(f"unknown job store kind {spec['kind']!r}")
    return open_backend(
        spec["models_dir"],
        spec.get("url") if spec["kind"] == "redis" else None,
        prefix=spec.get("prefix", DEFAULT_PREFIX),
        lease_s=spec.get("lease_s", DEFAULT_LEASE_S),
    )
