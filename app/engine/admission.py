"""Admission: how many sequences the process takes at once, and how many one API key may hold.

Both are checked on the event loop before a request's sequences reach an engine (app/generation.py),
so a full server answers 429 at once instead of queueing without bound.
"""

from __future__ import annotations


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
    """Sequences admitted per API key (TEXTGEN_MAX_RUNNING_PER_KEY), so one client cannot take every slot.

    Keys are known by their digest (app/auth.py: `key_id`). Without keys (an open server) there is
    no client identity to count by, and only the process-wide Admission bound applies. Only the
    event loop calls it, so a plain dict is enough.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0 = no limit
        self.admitted: dict[str, int] = {}

    def applies(self, key: str | None) -> bool:
        return key is not None and self.limit > 0

    def acquire(self, key: str | None, n: int) -> None:
        if key is None or not self.applies(key):
            return
        have = self.admitted.get(key, 0)
        if have + n > self.limit:
            raise Overloaded(f"this API key has {have} sequences running or waiting (limit {self.limit})")
        self.admitted[key] = have + n

    def release(self, key: str | None, n: int) -> None:
        if key is None or key not in self.admitted:
            return
        left = self.admitted[key] - n
        if left > 0:
            self.admitted[key] = left
        else:
            del self.admitted[key]
