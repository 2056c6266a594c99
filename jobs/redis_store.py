"""Jobs in Redis: the job store of Redis mode (records, event streams, the queue stream)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from jobs import records
from jobs.errors import JobNotFound, StoreUnavailable
from jobs.files import remove_job_files, write_corpus
from jobs.records import (
    DEFAULT_LEASE_S,
    FINAL_EVENTS,
    Changes,
    Claim,
    JobEvent,
    JobRecord,
    final_event_data,
    new_job_id,
    utc_now,
    validate_job_id,
)
from jobs.redis_client import DEFAULT_PREFIX, client_url, redis_errors

log = logging.getLogger(__name__)


# A running job's heartbeat: only while this worker still owns the queue entry (another worker
# may have claimed it after a long silence), reset the entry's idle time and stamp the record.
_HEARTBEAT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
redis.call('HSET', KEYS[2], 'heartbeat_at', ARGV[4])
return 1
"""

# Does this worker still own the queue entry?
_OWNS = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
return 1
"""

_RAW_FIELDS = ("id", "state", "created")  # stored as plain strings; every other field is JSON


class RedisStore:
    """Jobs in Redis: records, per-job event streams, and one queue stream with a consumer group.

        <p>job:<id>          hash: one field per JobRecord field (JSON values; id/state/created plain)
        <p>job:<id>:events   stream: kind + data (JSON); the SSE route reads it with XREAD BLOCK
        <p>jobs              sorted set: every job id by creation time (listing)
        <p>jobs:queued       sorted set: the queued job ids by creation time (queue position)
        <p>queue             stream: one entry per job to run, read through the group `workers`

    A worker takes entries with XREADGROUP; an entry stays pending until the job ends (XACK).
    While it runs, the worker's heartbeat resets the entry's idle time; an entry idle for
    longer than `lease_s` belongs to a dead worker and the next idle worker takes it over with
    XAUTOCLAIM, resuming from the job's saved state. A worker stopped with SIGTERM hands the
    entry back by making it look long idle, so the next free worker takes it at once.
    """

    GROUP = "workers"
    HANDED_BACK = "handed-back"  # the consumer that holds entries handed back, until a worker claims them

    def __init__(
        self,
        client: Any,
        models_dir: Path,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_s: float = DEFAULT_LEASE_S,
        events_maxlen: int = 5000,
    ) -> None:
        self.redis = client
        self.models_dir = Path(models_dir)
        self.prefix = prefix
        self.lease_s = lease_s
        self.events_maxlen = events_maxlen
        self.queue_key = f"{prefix}queue"
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._owns = client.register_script(_OWNS)
        self._group_ready = False

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "redis",
            "url": client_url(self.redis),
            "prefix": self.prefix,
            "models_dir": str(self.models_dir),
            "lease_s": self.lease_s,
        }

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{validate_job_id(job_id)}"

    def _events_key(self, job_id: str) -> str:
        return f"{self._job_key(job_id)}:events"

    def ping(self) -> None:
        with redis_errors():
            self.redis.ping()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.queue_key, self.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    # -- encoding

    @staticmethod
    def _encode(values: Changes) -> dict[str, str]:
        return {k: (v if k in _RAW_FIELDS else json.dumps(v, ensure_ascii=False)) for k, v in values.items()}

    @staticmethod
    def _decode(raw: dict[str, str]) -> JobRecord:
        values = {k: (v if k in _RAW_FIELDS else json.loads(v)) for k, v in raw.items()}
        return JobRecord.from_dict(values)

    # -- the API's side

    def submit(self, params: dict[str, Any], text: str, job_id: str | None = None) -> JobRecord:
        job_id = validate_job_id(job_id) if job_id else new_job_id()
        write_corpus(self.models_dir, job_id, text)
        record = JobRecord(id=job_id, state="queued", params=params, created=utc_now())
        score = time.time()
        with redis_errors():
            self._ensure_group()
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self._job_key(job_id), mapping=self._encode(record.to_dict()))
            pipe.zadd(f"{self.prefix}jobs", {job_id: score})
            pipe.zadd(f"{self.prefix}jobs:queued", {job_id: score})
            pipe.xadd(self._events_key(job_id), self._event_fields("queued", {"state": "queued"}))
            pipe.xadd(self.queue_key, {"job_id": job_id})
            pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord:
        with redis_errors():
            raw = self.redis.hgetall(self._job_key(job_id))
        if not raw:
            raise JobNotFound(f"no training job {job_id!r}")
        return self._decode(raw)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        records: list[JobRecord] = []
        start, page = 0, max(limit, 50)
        with redis_errors():
            while len(records) < limit:
                ids = self.redis.zrevrange(f"{self.prefix}jobs", start, start + page - 1)
                if not ids:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hgetall(self._job_key(job_id))
                for raw in pipe.execute():
                    if raw and (state is None or raw.get("state") == state):
                        records.append(self._decode(raw))
                start += page
        return records[:limit]

    def cancel(self, job_id: str) -> JobRecord:
        key = self._job_key(job_id)
        now = time.time()

        def txn(pipe: Any) -> JobRecord:
            raw = pipe.hgetall(key)
            if not raw:
                raise JobNotFound(f"no training job {job_id!r}")
            record = self._decode(raw)
            changes = records.cancel(record, now, self.lease_s)
            pipe.multi()
            if changes.get("state") == "cancelled":
                pipe.zrem(f"{self.prefix}jobs:queued", job_id)
            pipe.hset(key, mapping=self._encode(changes))
            record.apply(changes)
            return record

        with redis_errors():
            record = self.redis.transaction(txn, key, value_from_callable=True)
        if record.state == "cancelled":
            remove_job_files(self.models_dir, job_id)
            self.append_event(job_id, "cancelled", final_event_data(record))
        return record

    def pause(self, job_id: str) -> JobRecord:
        """A queued job (or one whose worker is gone) is paused at once, its queue entry removed; a running one
        is asked to save its state and stop."""
        key = self._job_key(job_id)
        now = time.time()

        def txn(pipe: Any) -> tuple[str, JobRecord]:
            raw = pipe.hgetall(key)
            if not raw:
                raise JobNotFound(f"no training job {job_id!r}")
            record = self._decode(raw)
            before = record.state
            changes = records.pause(record, now, self.lease_s)
            entries = self._queue_entries(pipe, job_id) if changes.get("state") == "paused" else []
            pipe.multi()
            if changes:
                pipe.hset(key, mapping=self._encode(changes))
            if entries:
                pipe.zrem(f"{self.prefix}jobs:queued", job_id)
                pipe.xack(self.queue_key, self.GROUP, *entries)
                pipe.xdel(self.queue_key, *entries)
            record.apply(changes)
            return before, record

        with redis_errors():
            self._ensure_group()
            before, record = self.redis.transaction(txn, key, value_from_callable=True)
        if record.state == "paused" and before != "paused":
            self.append_event(job_id, "paused", records.paused_event_data(record))
        return record

    def _queue_entries(self, client: Any, job_id: str) -> list[str]:
        """The queue's entries for `job_id` (the queue holds one per unfinished job that is not paused)."""
        return [eid for eid, fields in client.xrange(self.queue_key) if fields.get("job_id") == job_id]

    def resume(self, job_id: str) -> JobRecord:
        """A paused job goes back into the queue (a new entry), to go on from its saved state; a job asked to
        pause that has not yet paused is told to go on."""
        key = self._job_key(job_id)

        def txn(pipe: Any) -> tuple[str, JobRecord]:
            raw = pipe.hgetall(key)
            if not raw:
                raise JobNotFound(f"no training job {job_id!r}")
            record = self._decode(raw)
            before = record.state
            changes = records.resume(record)
            pipe.multi()
            pipe.hset(key, mapping=self._encode(changes))
            if before == "paused":
                pipe.zadd(f"{self.prefix}jobs:queued", {job_id: _created_score(record)})
                pipe.xadd(self.queue_key, {"job_id": job_id})
            record.apply(changes)
            return before, record

        with redis_errors():
            self._ensure_group()
            before, record = self.redis.transaction(txn, key, value_from_callable=True)
        if before == "paused":
            self.append_event(job_id, "resumed", {"state": "queued", "saved_step": record.saved_step})
        return record

    def events(self, job_id: str, after: str | None = None, block_s: float = 0.0) -> list[JobEvent]:
        key = self._events_key(job_id)
        with redis_errors():
            if block_s > 0:
                reply = self.redis.xread({key: after or "0"}, count=500, block=max(1, int(block_s * 1000)))
                entries = reply[0][1] if reply else []
            else:
                entries = self.redis.xrange(key, min=f"({after}" if after else "-", count=500)
        return [JobEvent(eid, f["kind"], json.loads(f["data"]), int(eid.split("-")[0]) / 1000) for eid, f in entries]

    def queue_position(self, job_id: str) -> int | None:
        with redis_errors():
            rank = self.redis.zrank(f"{self.prefix}jobs:queued", job_id)
        return None if rank is None else rank + 1

    def _request_key(self, key: str) -> str:
        return f"{self.prefix}request:{records.request_digest(key)}"

    def remember_request(self, key: str, job_id: str) -> str:
        """Bind an idempotency key to `job_id` unless it is bound already (SET NX, for every replica);
        returns the job it is bound to. A binding lasts `records.REQUEST_TTL_S`."""
        with redis_errors():
            if self.redis.set(self._request_key(key), job_id, nx=True, ex=records.REQUEST_TTL_S):
                return job_id
            bound = self.redis.get(self._request_key(key))
        return str(bound) if bound is not None else self.remember_request(key, job_id)

    def forget_request(self, key: str, job_id: str) -> None:
        """Unbind a key from `job_id` (its job was not stored after all)."""
        with redis_errors():
            if self.redis.get(self._request_key(key)) == job_id:
                self.redis.delete(self._request_key(key))

    # -- the workers' side

    def claim(self, worker: str, block_s: float) -> Claim | None:
        """An entry left by a dead (or stopped) worker first, else a new one; waits up to block_s."""
        with redis_errors():
            self._ensure_group()
            _, taken, _ = self.redis.xautoclaim(
                self.queue_key, self.GROUP, worker, min_idle_time=int(self.lease_s * 1000), start_id="0-0", count=1
            )
            if taken:
                entry_id, entry = taken[0]
                log.info("worker %s took over job %s (entry %s)", worker, entry.get("job_id"), entry_id)
            else:
                reply = self.redis.xreadgroup(
                    self.GROUP, worker, {self.queue_key: ">"}, count=1, block=max(1, int(block_s * 1000))
                )
                if not reply or not reply[0][1]:
                    return None
                entry_id, entry = reply[0][1][0]
        if not entry or "job_id" not in entry:  # trimmed away; nothing to run
            self._ack(entry_id)
            return None
        if taken:
            self._announce_takeover(entry["job_id"])
        return Claim(job_id=entry["job_id"], token=entry_id, worker=worker)

    def _announce_takeover(self, job_id: str) -> None:
        """A job taken from a worker gone silent (not a handed-back one) gets its `requeued` event.

        Best effort: the job is ours now, and losing the event beats leaving it for another lease."""
        try:
            with redis_errors():
                raw = self.redis.hgetall(self._job_key(job_id))
            record = self._decode(raw) if raw else None
            if record is not None and record.worker is not None:
                data = records.takeover_event_data(record, record.worker, self.lease_s)
                if data is not None:
                    self.append_event(job_id, "requeued", data)
        except StoreUnavailable as e:
            log.warning("job %s: the takeover was not recorded as an event: %s", job_id, e)

    def _ack(self, entry_id: str) -> None:
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(self.queue_key, self.GROUP, entry_id)
            pipe.xdel(self.queue_key, entry_id)
            pipe.execute()

    def _owner_check(self, claim: Claim) -> bool:
        return bool(self._owns(keys=[self.queue_key], args=[self.GROUP, claim.worker, claim.token]))

    def _transition(
        self,
        claim: Claim,
        transition: Callable[[JobRecord], Changes | None],
        queue_side: Callable[[Any, JobRecord], object],
    ) -> tuple[bool, JobRecord | None]:
        """Apply `transition` to the claimed job, and `queue_side` (the queue's part of the move) in the
        same transaction, while this worker owns the job's queue entry.

        -> (whether it owned the entry, the changed record or None when the transition did not apply)."""
        key = self._job_key(claim.job_id)

        def txn(pipe: Any) -> JobRecord | None:
            raw = pipe.hgetall(key)
            if not raw:
                return None
            record = self._decode(raw)
            changes = transition(record)
            if changes is None:
                return None
            record.apply(changes)
            pipe.multi()
            pipe.hset(key, mapping=self._encode(changes))
            queue_side(pipe, record)
            return record

        with redis_errors():
            if not self._owner_check(claim):
                return False, None
            return True, self.redis.transaction(txn, key, value_from_callable=True)

    def start(self, claim: Claim) -> JobRecord | None:
        """queued/running -> running; None (and the entry acknowledged) when the job ended meanwhile."""
        owned, record = self._transition(
            claim,
            lambda r: records.start(r, claim.worker, time.time()),
            lambda pipe, r: pipe.zrem(f"{self.prefix}jobs:queued", claim.job_id),
        )
        if owned and record is None:
            self._ack(claim.token)
        return record

    def heartbeat(self, claim: Claim) -> bool:
        with redis_errors():
            held = self._heartbeat(
                keys=[self.queue_key, self._job_key(claim.job_id)],
                args=[self.GROUP, claim.worker, claim.token, json.dumps(time.time())],
            )
        return bool(held)

    def update(self, job_id: str, **values: Any) -> None:
        with redis_errors():
            self.redis.hset(self._job_key(job_id), mapping=self._encode(values))

    def set_once(self, job_id: str, name: str, value: Any) -> Any:
        key = self._job_key(job_id)
        with redis_errors():
            current = self.redis.hget(key, name)
            if current is None or json.loads(current) is None:
                self.redis.hset(key, name, json.dumps(value))  # one writer: the worker holding the claim
                return value
            return json.loads(current)

    def _event_fields(self, kind: str, data: dict[str, Any]) -> dict[str, str]:
        return {"kind": kind, "data": json.dumps(data, ensure_ascii=False)}

    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        with redis_errors():
            return self.redis.xadd(
                self._events_key(job_id), self._event_fields(kind, data), maxlen=self.events_maxlen, approximate=True
            )

    def stop_requested(self, job_id: str) -> str | None:
        with redis_errors():
            cancel, pause = self.redis.hmget(self._job_key(job_id), "cancel_requested", "pause_requested")
        return "cancel" if cancel == "true" else "pause" if pause == "true" else None

    def finish(self, claim: Claim, state: str, **values: Any) -> bool:
        """running -> final, the entry acknowledged, atomically; then the final event."""

        def done(pipe: Any, record: JobRecord) -> None:
            pipe.zrem(f"{self.prefix}jobs:queued", claim.job_id)
            pipe.xack(self.queue_key, self.GROUP, claim.token)
            pipe.xdel(self.queue_key, claim.token)

        owned, record = self._transition(claim, lambda r: records.finish(r, state, values), done)
        if record is None:
            if owned:
                self._ack(claim.token)
            return False
        self.append_event(claim.job_id, FINAL_EVENTS[state], final_event_data(record))
        return True

    def mark_paused(self, claim: Claim) -> bool:
        """running -> paused (its state saved), the queue entry acknowledged: the worker is free, and a resume
        queues the job again with a new entry."""

        def done(pipe: Any, record: JobRecord) -> None:
            pipe.zrem(f"{self.prefix}jobs:queued", claim.job_id)
            pipe.xack(self.queue_key, self.GROUP, claim.token)
            pipe.xdel(self.queue_key, claim.token)

        _, record = self._transition(claim, records.paused, done)
        if record is not None:
            self.append_event(claim.job_id, "paused", records.paused_event_data(record))
        return record is not None

    def hand_back(self, claim: Claim, reason: str) -> bool:
        """running -> queued; the entry is made to look long idle so the next free worker claims it at once."""

        def requeue(pipe: Any, record: JobRecord) -> None:
            pipe.zadd(f"{self.prefix}jobs:queued", {claim.job_id: _created_score(record)})
            idle_ms = int(max(self.lease_s, 1.0) * 1000) * 1000
            pipe.xclaim(self.queue_key, self.GROUP, self.HANDED_BACK, 0, [claim.token], idle=idle_ms, justid=True)

        _, record = self._transition(claim, records.hand_back, requeue)
        if record is not None:
            self.append_event(claim.job_id, "requeued", records.requeued_event_data(record, claim.worker, reason))
        return record is not None

    def release(self, worker: str) -> None:
        """Forget the consumer name of a worker that exits, unless it still holds an entry (never lose a job)."""
        with contextlib.suppress(StoreUnavailable), redis_errors():
            self._ensure_group()
            held = self.redis.xpending_range(self.queue_key, self.GROUP, min="-", max="+", count=1, consumername=worker)
            if not held:
                self.redis.xgroup_delconsumer(self.queue_key, self.GROUP, worker)


def _created_score(record: JobRecord) -> float:
    try:
        return datetime.fromisoformat(record.created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()
