"""Follow the shared active pointer: every replica serves the model the pointer names.

A promotion made anywhere (a worker publishing a job's model, `POST /models/{id}/activate` on
another replica, the CLI) moves the one active pointer. Each replica then swaps the model in
through the holder (load and validate off the event loop, swap one reference, drain the old
version). `create_app` runs this for every app, whatever routers it mounts (`following`). It
learns of the move two ways:

- the "activated" notice on Redis pub/sub, for a swap within a moment of the publish;
- a reconcile of the pointer at start and every `reconcile_s` seconds, because pub/sub drops
  what is sent while a subscriber is away (and embedded mode has no pub/sub at all).

Following never moves the pointer (`activate(..., persist=False)`): if it moved on while this
replica was loading, writing the id it loaded would undo a newer promotion. If it did move on,
the next reconcile follows the newer id.

Aliases (lm/aliases.py) are followed the same way: each reconcile reads them all and loads what
they name, woken at once by a notice on the aliases channel (jobs/aliases.py).

A checkpoint that fails validation is refused once and remembered: the old model keeps
serving, and the replica does not reload the broken one every few seconds.

In Redis mode `RedisHealth` pings Redis beside it, a few times a second, and /readyz reports
the last answer without waiting on Redis itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.errors import ApiError
from app.holder import ModelHolder
from app.settings import Settings
from jobs.aliases import aliases_channel
from jobs.errors import StoreUnavailable
from jobs.pointer import activated_channel
from jobs.store import Backend
from lm.aliases import AliasStore
from lm.errors import CheckpointError, ModelNotFound, TextgenError
from lm.registry import ActivePointer

log = logging.getLogger(__name__)

PING_EVERY_S = 0.2  # /readyz sees Redis down at most PING_EVERY_S + PING_TIMEOUT_S after it stops answering
PING_TIMEOUT_S = 0.4  # a PING not answered within this counts as Redis down


class Reconciler:
    """One task per replica: wake on a notice or every `interval_s`, and follow the pointer."""

    def __init__(
        self,
        holder: ModelHolder,
        pointer: ActivePointer,
        *,
        interval_s: float,
        redis_url: str | None = None,
        channel: str | None = None,
        aliases: AliasStore | None = None,
        alias_channel: str | None = None,
    ) -> None:
        self.holder = holder
        self.pointer = pointer
        self.interval_s = interval_s
        self.redis_url = redis_url
        self.channel = channel
        self.aliases = aliases
        self.alias_channel = alias_channel
        self.refused: str | None = None  # the id whose checkpoint failed validation
        self.refused_targets: set[str] = set()  # alias targets whose checkpoints failed validation
        self.wake = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._poll())
            if self.redis_url and self.channel:
                tasks.create_task(self._listen())

    async def _poll(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciling the active model failed; trying again in %.1fs", self.interval_s)
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that lands as the
            # event is set, and then this loop outlives its task's cancel (and shutdown waits on it)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self.wake.wait()

    async def reconcile(self) -> None:
        """Swap in the model the pointer names, unless it is already active or was refused; load what the
        aliases name."""
        await self._follow_pointer()
        if self.aliases is not None:
            try:
                aliases = await asyncio.to_thread(self.aliases.all)
            except StoreUnavailable as e:
                log.warning("not following the aliases now: %s", e)
                return
            await self.holder.follow_aliases(aliases, self.refused_targets)

    async def _follow_pointer(self) -> None:
        target = await asyncio.to_thread(self.pointer.get)
        current = self.holder.active.model_id if self.holder.active is not None else None
        if target is None or target == current or target == self.refused:
            return
        log.info("the active pointer names %s (serving %s): swapping it in", target, current)
        try:
            await self.holder.activate(target, persist=False)
        except StoreUnavailable as e:
            log.warning("not swapping to %s now: %s", target, e)
        except ModelNotFound:
            log.warning("the active pointer names %s, which is not in the models folder (yet?)", target)
        except (CheckpointError, ApiError, TextgenError) as e:
            self.refused = target
            log.error("refused model %s, %s keeps serving: %s", target, current, getattr(e, "message", e))

    async def _listen(self) -> None:
        """Wake the poll on every "activated" notice; resubscribe after a Redis outage."""
        assert self.redis_url and self.channel
        while True:
            client: Any = redis.asyncio.Redis.from_url(self.redis_url, decode_responses=True)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(*[c for c in (self.channel, self.alias_channel) if c])
                    self.wake.set()  # notices sent while we were away are lost: reconcile now
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            log.info("notice on %s: %s", message.get("channel"), message.get("data"))
                            self.wake.set()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                log.warning("activated notices: %s; resubscribing in 1s", e)
                await asyncio.sleep(1.0)
            finally:
                await client.aclose()


class RedisHealth:
    """Whether Redis answered its last PING, as /readyz reports it; None in embedded mode.

    `watch` pings every PING_EVERY_S on a connection of its own with a short timeout and no retry,
    so a Redis that died (connection refused) or hangs (no answer) reads "down" within a second,
    where the job store's client would wait out its retries and its 10 s timeout. A PING is the
    cheapest command Redis has; a few a second per replica cost it nothing.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.up: bool | None = None  # None: not checked yet
        self.client: Any = None  # redis.asyncio.Redis, opened by `open` in Redis mode

    @property
    def status(self) -> Literal["up", "down"] | None:
        if self.backend.redis is None:
            return None
        return "up" if self.up else "down"

    def open(self, url: str) -> None:
        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=PING_TIMEOUT_S, socket_connect_timeout=PING_TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def check(self) -> bool | None:
        """Ping Redis (Redis mode only) and remember whether it answered in time."""
        if self.client is None:
            return None
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await self.client.ping()
            self.up = True
        except (redis.RedisError, OSError, TimeoutError):
            self.up = False
        return self.up

    async def watch(self, interval_s: float = PING_EVERY_S) -> None:
        while True:
            was = self.up
            now = await self.check()
            if now != was:
                log.log(logging.INFO if now else logging.WARNING, "Redis is %s", "up" if now else "down")
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def following(
    holder: ModelHolder, backend: Backend, health: RedisHealth, settings: Settings
) -> AsyncIterator[Reconciler]:
    """While open: the reconcile loop follows the active pointer, and Redis's health is watched."""
    if settings.redis_url:
        health.open(settings.redis_url)
    await health.check()
    reconciler = Reconciler(
        holder,
        backend.pointer,
        interval_s=settings.reconcile_s,
        redis_url=settings.redis_url,
        channel=activated_channel(settings.redis_prefix) if settings.redis_url else None,
        aliases=backend.aliases,
        alias_channel=aliases_channel(settings.redis_prefix) if settings.redis_url else None,
    )

    async def run() -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(reconciler.run())
            if health.client is not None:
                tasks.create_task(health.watch())

    task = asyncio.create_task(run(), name="reconcile-active-model")
    try:
        yield reconciler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await health.close()
