"""Connecting to Redis, and its outages as `StoreUnavailable`: the one place the job system meets redis-py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.errors import StoreUnavailable

DEFAULT_PREFIX = "textgen:"  # every Redis key and channel of a deployment starts with this


def connect_redis(url: str, *, socket_timeout: float = 10.0) -> Any:
    """A client that fails fast while Redis is down (StoreUnavailable upstream) and reconnects by itself."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        health_check_interval=15,
    )


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn a lost connection into StoreUnavailable, a retryable error the API answers with 503."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise StoreUnavailable("Redis is unreachable; retry in a few seconds", detail=str(e)) from None


def client_url(client: Any) -> str:
    """Rebuild a redis:// URL from a client's connection settings (for a job's child process)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    auth = ""
    if kwargs.get("password"):
        user = kwargs.get("username") or ""
        auth = f"{user}:{kwargs['password']}@"
    return f"redis://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
