"""Model aliases in Redis mode: one hash beside the active pointer, compare-and-set in Lua, a notice.

The hash `<prefix>aliases` holds one field per alias, the record lm/aliases.py describes (production's
holds only its canary: its model is the active pointer key itself). A change of production moves
the pointer and publishes the "activated" notice in the same script, exactly as jobs/pointer.py
does; every change publishes the alias's name on `<prefix>aliases`, so replicas follow at once,
and the reconcile (app/reconcile.py) catches what pub/sub dropped.
"""

from __future__ import annotations

from typing import Any

from jobs.pointer import RedisPointer
from jobs.redis_client import DEFAULT_PREFIX, redis_errors
from lm.aliases import PRODUCTION, Alias, parse

# KEYS[1] the hash, KEYS[2] the active pointer, KEYS[3] the "activated" channel, KEYS[4] the aliases channel.
# ARGV[1] the alias, ARGV[2] its expected record ("" = none), ARGV[3] the new record ("" = delete),
# ARGV[4] "1" for production, ARGV[5] the expected pointer ("" = none), ARGV[6] the new pointer.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
if ARGV[4] == '1' then
  local active = redis.call('GET', KEYS[2]) or ''
  if active ~= ARGV[5] then return 0 end
  if ARGV[6] ~= '' and active ~= ARGV[6] then
    redis.call('SET', KEYS[2], ARGV[6])
    redis.call('PUBLISH', KEYS[3], ARGV[6])
  end
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('PUBLISH', KEYS[4], ARGV[1])
return 1
"""


def aliases_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """The pub/sub channel of alias changes (the message is the alias's name)."""
    return f"{prefix}aliases"


class RedisAliases:
    """lm.aliases.AliasStore backed by the hash `<prefix>aliases` and the active pointer's key."""

    def __init__(self, client: Any, pointer: RedisPointer, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = client
        self.pointer = pointer
        self.key = f"{prefix}aliases"
        self.channel = aliases_channel(prefix)
        self._cas = client.register_script(_COMPARE_AND_SET)

    def all(self) -> dict[str, Alias]:
        with redis_errors():
            pipe = self.redis.pipeline()  # MULTI/EXEC: the hash and the pointer as of one moment
            pipe.hgetall(self.key)
            pipe.get(self.pointer.key)
            records, active = pipe.execute()
        records = dict(records)
        if active:
            records.setdefault(PRODUCTION, "")
        found = {name: parse(name, stored, active or None) for name, stored in records.items()}
        return {name: alias for name, alias in sorted(found.items()) if alias is not None}

    def compare_and_set(self, expected: Alias | None, new: Alias, *, delete: bool = False) -> bool:
        production = new.name == PRODUCTION
        args = [
            new.name,
            expected.stored if expected is not None else "",
            "" if delete else new.serialized(),
            "1" if production else "0",
            (expected.model if expected is not None else "") if production else "",
            new.model if production and not delete else "",
        ]
        keys = [self.key, self.pointer.key, self.pointer.channel, self.channel]
        with redis_errors():
            return bool(self._cas(keys=keys, args=args))
