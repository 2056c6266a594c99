"""The active model pointer in Redis mode: one key, compare-and-set in Lua, an "activated" notice.

Every replica of the API and every worker shares this key, so a promotion made anywhere (a
finished job, `POST /models/{id}/activate` on any replica) is seen everywhere. The compare-and-set
and the pub/sub notice happen in one script: a notice is sent exactly when the pointer moved.
Pub/sub drops messages sent while a subscriber is away, so replicas also reconcile with `get()`
at start and every few seconds (app/reconcile.py). The embedded mode's pointer is the file
models/ACTIVE (lm/registry.py `FilePointer`); both implement lm.registry.ActivePointer.
"""

from __future__ import annotations

import logging
from typing import Any

from jobs.errors import StoreUnavailable
from jobs.redis_client import DEFAULT_PREFIX, redis_errors
from lm.checkpoint import validate_model_id
from lm.errors import InvalidModelId

log = logging.getLogger(__name__)

# KEYS[1] the pointer, KEYS[2] the notice channel; ARGV[1] the expected id ("" = none), ARGV[2] the new id.
# Setting the pointer to the value it already has succeeds without a notice.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if current ~= ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
end
return 1
"""


def activated_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """The pub/sub channel of the "activated" notices."""
    return f"{prefix}activated"


class RedisPointer:
    """lm.registry.ActivePointer backed by the Redis key `<prefix>active_model`."""

    def __init__(self, client: Any, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = client
        self.key = f"{prefix}active_model"
        self.channel = activated_channel(prefix)
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._last: str | None = None  # what get() answers while Redis is down

    def get(self) -> str | None:
        """The active id; while Redis is unreachable, the last id read (listings keep working)."""
        try:
            return self.read()
        except StoreUnavailable as e:
            log.warning("active pointer: %s; answering the last known value %r", e, self._last)
            return self._last

    def read(self) -> str | None:
        """The active id as Redis holds it now; StoreUnavailable while Redis is down.

        Changes that must not act on a stale answer (deleting a model) read through this.
        """
        with redis_errors():
            value = self.redis.get(self.key)
        if not value:
            self._last = None
            return None
        try:
            self._last = validate_model_id(value)
        except InvalidModelId:
            log.warning("%s holds %r, which is not a model id; treating as no active model", self.key, value)
            self._last = None
        return self._last

    def compare_and_set(self, expected: str | None, new: str) -> bool:
        """Point at `new` if the pointer is still `expected`; StoreUnavailable while Redis is down."""
        validate_model_id(new)
        with redis_errors():
            moved = bool(self._cas(keys=[self.key, self.channel], args=[expected or "", new]))
        if moved:
            self._last = new
        return moved
