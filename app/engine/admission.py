"""Admission: how many sequences the process takes at once, and how many one client may hold.

Both are checked on the event loop before a request's sequences reach an engine (app/generation.py),
so a full server answers 429 at once instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib


class Overloaded(Exception):
    """More sequences than max_running + max_waiting: the request is answered 429."""


class Admission:
    """The process-wide bound on admitted sequences (running + waiting), checked before a request starts.

    Only the event loop calls it, so a plain counter is enough.
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.capacity = max_running + max_waiting
        self.admitted = 0

    def acquire(self, n: int) -> None:
        if self.admitted + n > self.capacity:
            raise Overloaded(f"{self.admitted} sequences are running or waiting (limit {self.capacity})")
        self.admitted += n

    def release(self, n: int) -> None:
        self.admitted = max(0, self.admitted - n)


class KeyLimits:
    """Sequences admitted per client, so one client cannot take every slot.

    A client is its API key (known by its digest, app/auth.py: `key_id`) on a server with keys
    (TEXTGEN_MAX_RUNNING_PER_KEY), or its address ("ip:1.2.3.4") on one without
    (TEXTGEN_MAX_RUNNING_PER_CLIENT): app/generation.py `client_limits` picks which. Only the event
    loop calls it, so a plain dict is enough.
    """

    def __init__(
        self,
        limit: int,
        *,
        client: str = "API key",
        setting: str = "TEXTGEN_MAX_RUNNING_PER_KEY",
        code: str = "key_overloaded",
    ) -> None:
        self.limit = limit  # 0 = no limit
        self.client = client  # what a client is, for messages
        self.setting = setting  # the setting that sets the limit, for messages
        self.code = code  # the error code of a 429 for this limit
        self.admitted: dict[str, int] = {}
        self._freed = asyncio.Event()  # set (and replaced) by every release

    def applies(self, key: str | None) -> bool:
        return key is not None and self.limit > 0

    def acquire(self, key: str | None, n: int) -> None:
        if key is None or not self.applies(key):
            return
        have = self.admitted.get(key, 0)
        if have + n > self.limit:
            raise Overloaded(f"this {self.client} has {have} sequences running or waiting (limit {self.limit})")
        self.admitted[key] = have + n

    async def acquire_soon(self, key: str | None, n: int, grace_s: float = 0.25) -> None:
        """`acquire`, after waiting up to `grace_s` for the client's own slots to come back.

        A client that leaves a stream and at once sends its next request is often seen leaving a moment
        after that request arrives (the disconnect reaches the stream through its cancellation): at its
        limit, it would be refused for a slot it no longer holds. (64 streaming clients on one address at
        a limit of 64, a fifth of them leaving after 2 events: 149 of 960 requests refused without the wait.)
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while True:
            try:
                self.acquire(key, n)
                return
            except Overloaded:
                left = deadline - loop.time()
                if left <= 0:
                    raise
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):  # not wait_for, which can swallow a cancellation in 3.11
                        await self._freed.wait()

    def release(self, key: str | None, n: int) -> None:
        if key is None or key not in self.admitted:
            return
        left = self.admitted[key] - n
        if left > 0:
            self.admitted[key] = left
        else:
            del self.admitted[key]
        self._freed.set()  # wakes the requests waiting in acquire_soon; later ones wait on a new event
        self._freed = asyncio.Event()
