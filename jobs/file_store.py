"""Job records as files under models/jobs/: the job store of embedded mode (no Redis)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs import records
from jobs.errors import JobNotFound
from jobs.files import JOBS_DIR, remove_job_files, write_corpus
from jobs.records import (
    DEFAULT_LEASE_S,
    FINAL_EVENTS,
    JOB_ID_RE,
    Changes,
    Claim,
    JobEvent,
    JobRecord,
    claimable,
    final_event_data,
    new_job_id,
    utc_now,
    validate_job_id,
)
from lm.files import atomic_write

REQUESTS_DIR = ".requests"  # idempotency keys of job creations, one file each


class FileStore:
    """Job records as JSON files under models/jobs/, for one machine without Redis.

    Every read-modify-write of a record holds an flock on the job's `.lock`; a claim holds the
    queue's lock (models/jobs/.queue.lock), so two local workers never take the same job.
    Records are replaced atomically: a reader sees the old record or the new one.
    """

    RECORD = "job.json"
    EVENTS = "events.jsonl"

    def __init__(self, models_dir: Path, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.models_dir = Path(models_dir)
        self.root = self.models_dir / JOBS_DIR
        self.lease_s = lease_s

    def spec(self) -> dict[str, Any]:
        return {"kind": "file", "models_dir": str(self.models_dir), "lease_s": self.lease_s}

    def ping(self) -> None:
        return None

    # -- files and locks

    def _dir(self, job_id: str) -> Path:
        return self.root / validate_job_id(job_id)

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _read(self, job_id: str) -> JobRecord:
        try:
            data = json.loads((self._dir(job_id) / self.RECORD).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobNotFound(f"no training job {job_id!r}") from None
        return JobRecord.from_dict(data)

    def _write(self, record: JobRecord) -> None:
        text = json.dumps(record.to_dict(), ensure_ascii=False, indent=1)
        atomic_write(self._dir(record.id) / self.RECORD, text.encode("utf-8"))

    def _modify(self, job_id: str, change: Callable[[JobRecord], Changes | None]) -> tuple[bool, JobRecord]:
        """Apply the fields `change` returns under the job's lock; None leaves the record as it was."""
        with self._locked(self._dir(job_id) / ".lock"):
            record = self._read(job_id)
            changes = change(record)
            if changes is not None:
                record.apply(changes)
                self._write(record)
        return changes is not None, record

    # -- the API's side

    def submit(self, params: dict[str, Any], text: str, job_id: str | None = None) -> JobRecord:
        job_id = validate_job_id(job_id) if job_id else new_job_id()
        write_corpus(self.models_dir, job_id, text)
        record = JobRecord(id=job_id, state="queued", params=params, created=utc_now())
        with self._locked(self._dir(job_id) / ".lock"):
            self._write(record)
        self.append_event(job_id, "queued", {"state": "queued"})
        return record

    def get(self, job_id: str) -> JobRecord:
        return self._read(job_id)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        records = []
        for job_id in self._ids(newest_first=True):
            try:
                record = self._read(job_id)
            except (JobNotFound, json.JSONDecodeError):
                continue  # being created, or not a job folder
            if state is None or record.state == state:
                records.append(record)
            if len(records) >= limit:
                break
        return records

    def _ids(self, newest_first: bool = False) -> list[str]:
        if not self.root.is_dir():
            return []
        ids = [p.name for p in self.root.iterdir() if JOB_ID_RE.fullmatch(p.name)]
        return sorted(ids, reverse=newest_first)

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job (or one whose worker is gone) is cancelled at once; a running one is asked to stop."""
        now = time.time()
        _, record = self._modify(job_id, lambda r: records.cancel(r, now, self.lease_s))
        if record.state == "cancelled":
            remove_job_files(self.models_dir, job_id)
            self.append_event(job_id, "cancelled", final_event_data(record))
        return record

    def pause(self, job_id: str) -> JobRecord:
        """A queued job (or one whose worker is gone) is paused at once; a running one is asked to save and stop."""
        now = time.time()
        before: list[str] = []

        def change(record: JobRecord) -> Changes:
            before.append(record.state)
            return records.pause(record, now, self.lease_s)

        _, record = self._modify(job_id, change)
        if record.state == "paused" and before[-1] != "paused":
            self.append_event(job_id, "paused", records.paused_event_data(record))
        return record

    def resume(self, job_id: str) -> JobRecord:
        """A paused job is queued again, to go on from its saved state; a pausing one is told to go on."""
        before: list[str] = []

        def change(record: JobRecord) -> Changes:
            before.append(record.state)
            return records.resume(record)

        _, record = self._modify(job_id, change)
        if before[-1] == "paused":
            self.append_event(job_id, "resumed", {"state": "queued", "saved_step": record.saved_step})
        return record

    def events(self, job_id: str, after: str | None = None, block_s: float = 0.0) -> list[JobEvent]:
        """Events after the opaque id `after` (a byte offset in events.jsonl), waiting up to block_s for one."""
        path = self._dir(job_id) / self.EVENTS
        offset = int(after) if after and after.isdigit() else 0
        deadline = time.monotonic() + block_s
        while True:
            found = self._read_events(path, offset)
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _read_events(self, path: Path, offset: int) -> list[JobEvent]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        found = []
        for line in chunk.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a line being appended right now
            offset += len(line)
            entry = json.loads(line)
            found.append(JobEvent(str(offset), entry["kind"], entry["data"], records.unix_time(entry.get("time"))))
        return found

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to start; None when the job is not queued."""
        if self._read(job_id).state != "queued":
            return None
        ahead = 0
        for other in self._ids():
            if other == job_id:
                return ahead + 1
            with contextlib.suppress(JobNotFound, json.JSONDecodeError):
                ahead += self._read(other).state == "queued"
        return None

    def remember_request(self, key: str, job_id: str) -> str:
        """Bind an idempotency key to `job_id` unless it is bound already; returns the job it is bound to.

        The binding is a file under models/jobs/.requests/, linked into place (a link never replaces a
        file): of two requests with one key, exactly one binds it."""
        folder = self.root / REQUESTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / records.request_digest(key)
        tmp = folder / f".tmp-{secrets.token_hex(4)}"
        try:
            atomic_write(tmp, job_id.encode("ascii"))
            try:
                os.link(tmp, target)
            except FileExistsError:
                return target.read_text(encoding="ascii").strip()
        finally:
            tmp.unlink(missing_ok=True)
        return job_id

    def forget_request(self, key: str, job_id: str) -> None:
        """Unbind a key from `job_id` (its job was not stored after all)."""
        target = self.root / REQUESTS_DIR / records.request_digest(key)
        with contextlib.suppress(FileNotFoundError):
            if target.read_text(encoding="ascii").strip() == job_id:
                target.unlink()

    # -- the workers' side

    def claim(self, worker: str, block_s: float) -> Claim | None:
        """The oldest job left by a dead worker, else the oldest queued job; polls up to block_s."""
        deadline = time.monotonic() + block_s
        while True:
            claim = self._claim_once(worker)
            if claim is not None or time.monotonic() >= deadline:
                return claim
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _claim_once(self, worker: str) -> Claim | None:
        with self._locked(self.root / ".queue.lock"):
            now = time.time()
            candidates: list[JobRecord] = []
            for job_id in self._ids():
                try:
                    record = self._read(job_id)
                except (JobNotFound, json.JSONDecodeError):
                    continue
                if not claimable(record, now, self.lease_s):
                    continue
                if record.state == "running":
                    candidates.insert(0, record)  # resume abandoned work first
                else:
                    candidates.append(record)
            for record in candidates:
                claim = Claim(job_id=record.id, token=secrets.token_hex(8), worker=worker)
                if self._take(claim):
                    return claim
        return None

    def _take(self, claim: Claim) -> bool:
        """Take the job for this claim; one taken from a worker gone silent gets its `requeued` event."""
        holder, now = _holder(claim), time.time()
        takeover: dict[str, Any] | None = None

        def take(record: JobRecord) -> Changes | None:
            nonlocal takeover
            changes = records.take(record, holder, now, self.lease_s)
            if changes is not None and record.worker is not None:
                takeover = records.takeover_event_data(record, _worker(record.worker), self.lease_s)
            return changes

        taken, _ = self._modify(claim.job_id, take)
        if takeover is not None:
            self.append_event(claim.job_id, "requeued", takeover)
        return taken

    def _held(
        self, claim: Claim, transition: Callable[[JobRecord], Changes | None]
    ) -> Callable[[JobRecord], Changes | None]:
        """`transition`, only while this claim holds the job (a file claim lives in the record's `worker`)."""
        return lambda r: transition(r) if r.worker == _holder(claim) else None

    def start(self, claim: Claim) -> JobRecord | None:
        """queued/running -> running under this claim; None when the job ended meanwhile (cancelled)."""
        started, record = self._modify(
            claim.job_id, self._held(claim, lambda r: records.start(r, _holder(claim), time.time()))
        )
        return record if started else None

    def heartbeat(self, claim: Claim) -> bool:
        held, _ = self._modify(
            claim.job_id, self._held(claim, lambda r: None if r.final else {"heartbeat_at": time.time()})
        )
        return held

    def update(self, job_id: str, **values: Any) -> None:
        self._modify(job_id, lambda r: values)

    def set_once(self, job_id: str, name: str, value: Any) -> Any:
        """Set a field that is still None; returns the field's value afterwards."""
        _, record = self._modify(job_id, lambda r: {name: value} if getattr(r, name) is None else None)
        return getattr(record, name)

    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        path = self._dir(job_id) / self.EVENTS
        line = json.dumps({"kind": kind, "data": data, "time": utc_now()}, ensure_ascii=False) + "\n"
        with self._locked(self._dir(job_id) / ".events.lock"), open(path, "ab") as f:
            f.write(line.encode("utf-8"))
            return str(f.tell())

    def stop_requested(self, job_id: str) -> str | None:
        return records.stop_request(self._read(job_id))

    def finish(self, claim: Claim, state: str, **values: Any) -> bool:
        """running -> a final state, with the final event; False when this claim no longer holds the job."""
        done, record = self._modify(claim.job_id, self._held(claim, lambda r: records.finish(r, state, values)))
        if done:
            self.append_event(claim.job_id, FINAL_EVENTS[state], final_event_data(record))
        return done

    def mark_paused(self, claim: Claim) -> bool:
        """running -> paused (its state saved), the worker freed; False when this claim no longer holds the job."""
        done, record = self._modify(claim.job_id, self._held(claim, records.paused))
        if done:
            self.append_event(claim.job_id, "paused", records.paused_event_data(record))
        return done

    def hand_back(self, claim: Claim, reason: str) -> bool:
        """running -> queued, to be resumed by the next free worker; the start does not count as an attempt."""
        done, record = self._modify(claim.job_id, self._held(claim, records.hand_back))
        if done:
            self.append_event(claim.job_id, "requeued", records.requeued_event_data(record, claim.worker, reason))
        return done

    def release(self, worker: str) -> None:
        """Nothing to forget: a file claim lives in the job's record and ends with it."""
        return None


def _holder(claim: Claim) -> str:
    """What a file claim writes in the record's `worker`: the worker and the hold's own token."""
    return f"{claim.worker}/{claim.token}"


def _worker(holder: str) -> str:
    """The worker's name in a record's `worker` (a file claim adds its token)."""
    return holder.partition("/")[0]
