"""The job record, its events, a worker's claim on it, and the state machine both stores run.

    queued -> running -> succeeded | failed | cancelled
    running -> queued                  handed back (the worker was stopped; the job resumes)
    queued | running | paused -> cancelled   at once when queued, paused or abandoned, else by the worker
    queued | running -> paused         at once when queued or abandoned, else by the worker, which saves
                                       the training state where it is and frees itself
    paused -> queued                   resumed: the next free worker goes on from the saved state

Each transition below is written once, as a function of a record that returns the fields it
changes (None: the transition does not apply). The stores differ only in how they make the read
and the write one atomic step: FileStore under an flock, RedisStore in a WATCH/MULTI transaction.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from jobs.errors import JobConflict, JobNotFound

STATES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
FINAL_EVENTS = {"succeeded": "done", "failed": "failed", "cancelled": "cancelled"}
JOB_ID_RE = re.compile(r"job-[0-9]{17}-[0-9a-f]{6}")
DEFAULT_LEASE_S = 30.0  # a running job whose worker is silent this long is claimed by another worker
REQUEST_TTL_S = 24 * 3600  # how long Redis keeps an idempotency key of a job creation
MAX_ATTEMPTS = 3  # starts that ended with the worker dying; then the job fails

Changes = dict[str, Any]


@dataclass
class JobRecord:
    """One training job, as GET /train/{id} shows it (internal fields are marked)."""

    id: str
    state: str
    params: dict[str, Any]  # the POST /train fields, minus the text; params["name"] is the model to publish
    created: str  # ISO-8601 UTC
    started: str | None = None  # first start
    finished: str | None = None
    progress: dict[str, Any] | None = None  # the last progress event (step, epoch, loss, tokens/s, ETA)
    metrics: dict[str, Any] | None = None  # per-epoch losses while running; the final metrics at the end
    model_id: str | None = None  # the published model, once succeeded
    activated: bool | None = None  # whether the published model became the active one
    error: str | None = None  # why it failed, in words a user can act on
    note: str | None = None  # what else the user should know (e.g. why a published model was not activated)
    attempts: int = 0  # starts that did not end cleanly yet (a hand-back does not count)
    worker: str | None = None  # the worker running it
    cancel_requested: bool = False
    pause_requested: bool = False  # a running job is asked to save its state and stop (-> paused)
    heartbeat_at: float | None = None  # unix time of the running worker's last heartbeat
    saved_epoch: int = 0  # internal: the last epoch whose resumable state was saved; a resume starts after it
    saved_step: int = 0  # internal: the step that state was saved at (mid-epoch when the job was paused or stopped)
    # internal: the active model id when the job first started ("" = none, None = not recorded);
    # the publish is a compare-and-set against it, so a newer promotion is never overwritten
    active_at_start: str | None = None
    # the quality gate's verdict before activation (worker/publish.py `Gate`): result, reason, losses;
    # recorded once, so a resumed run of a published job decides as the first did
    gate: dict[str, Any] | None = None
    # the job's per-epoch checkpoints still kept, oldest first (worker/checkpoints.py): model_id, step, epoch,
    # train_loss, val_loss, created
    checkpoints: list[dict[str, Any]] | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def apply(self, changes: Changes) -> None:
        for name, value in changes.items():
            setattr(self, name, value)


@dataclass
class JobEvent:
    """One entry of a job's event log; `id` is opaque and increasing (an SSE `id:`)."""

    id: str
    # queued | started | progress | epoch | checkpoint | model_checkpoint | requeued | paused | resumed | gate |
    # published | done | failed | cancelled
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float | None = None  # unix time it was recorded (None where the store does not know)


@dataclass
class Claim:
    """A worker's hold on one job; `token` identifies this hold (a stream entry id, or a random nonce)."""

    job_id: str
    token: str
    worker: str


def new_job_id() -> str:
    """Sortable by creation time: job-<YYYYmmddHHMMSS><milliseconds>-<6 hex>."""
    now = datetime.now(UTC)
    return f"job-{now:%Y%m%d%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def validate_job_id(job_id: str) -> str:
    """Return the id unchanged or raise JobNotFound; call before the id touches a path or a key."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise JobNotFound(f"no training job {job_id!r}: job ids look like job-20250101120000123-3fa9c1")
    return job_id


def request_digest(key: str) -> str:
    """An idempotency key as the stores keep it: a digest (any length, any characters, never a path)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def unix_time(iso: str | None) -> float | None:
    """A `utc_now()` string as unix time; None for None or a string that is not one."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None
    except ValueError:
        return None


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def final_event_data(record: JobRecord) -> dict[str, Any]:
    return {
        "state": record.state,
        "model_id": record.model_id,
        "activated": record.activated,
        "metrics": record.metrics,
        "error": record.error,
        "note": record.note,
        "gate": record.gate,
    }


def requeued_event_data(record: JobRecord, worker: str, reason: str) -> dict[str, Any]:
    """The `requeued` event: the worker the job left, and the saved epoch it resumes after (0: from the start)."""
    return {
        "state": "queued",
        "reason": reason,
        "worker": worker,
        "saved_epoch": record.saved_epoch,
        "saved_step": record.saved_step,
    }


def takeover_event_data(record: JobRecord, worker: str, lease_s: float) -> dict[str, Any] | None:
    """The `requeued` event of a job taken from a worker gone silent, `worker` (`record` as it was before
    the take); None for a job that was simply queued, which its hand-back or submission already announced."""
    if record.state != "running":
        return None
    saved = (
        f"its state saved at step {record.saved_step} ({record.saved_epoch} epochs done)"
        if record.saved_step or record.saved_epoch
        else "the start"
    )
    reason = f"worker {worker} stopped heartbeating for over {lease_s:g}s; the job resumes from {saved}"
    return requeued_event_data(record, worker, reason)


# ---------------------------------------------------------------------------- leases


def claimable(record: JobRecord, now: float, lease_s: float) -> bool:
    """Queued and not taken by a live worker, or running with a worker that has gone silent."""
    if record.state not in ("queued", "running"):
        return False
    return record.worker is None or record.heartbeat_at is None or now - record.heartbeat_at > lease_s


def lease_expired(record: JobRecord, now: float, lease_s: float) -> bool:
    return record.state == "running" and (record.heartbeat_at is None or now - record.heartbeat_at > lease_s)


# ---------------------------------------------------------------------------- transitions


def take(record: JobRecord, holder: str, now: float, lease_s: float) -> Changes | None:
    """A worker takes a claimable job (the file store keeps a claim in the record; Redis in its queue)."""
    return {"worker": holder, "heartbeat_at": now} if claimable(record, now, lease_s) else None


def start(record: JobRecord, worker: str, now: float) -> Changes | None:
    """queued/running -> running under `worker`: one more attempt; None when the job ended or was paused meanwhile."""
    if record.final or record.state == "paused":
        return None
    return {
        "state": "running",
        "attempts": record.attempts + 1,
        "started": record.started or utc_now(),
        "worker": worker,
        "heartbeat_at": now,
    }


def finish(record: JobRecord, state: str, values: Changes) -> Changes | None:
    """running -> a final state, with the outcome's fields; None when the job already ended."""
    if state not in FINAL_STATES:
        raise ValueError(f"{state!r} is not a final state")
    if record.final:
        return None
    return {"state": state, "finished": utc_now(), "worker": None, **values}


def hand_back(record: JobRecord) -> Changes | None:
    """running -> queued, for the next free worker; the start does not count as an attempt."""
    if record.final:
        return None
    return {"state": "queued", "worker": None, "heartbeat_at": None, "attempts": max(0, record.attempts - 1)}


def cancel(record: JobRecord, now: float, lease_s: float) -> Changes:
    """A queued job (or one whose worker is gone) is cancelled at once; a running one is asked to stop.

    JobConflict for a job that has already ended."""
    if record.final:
        raise JobConflict(f"job {record.id} has already {record.state}; there is nothing to cancel")
    changes: Changes = {"cancel_requested": True}
    if record.state in ("queued", "paused") or lease_expired(record, now, lease_s * 2):
        changes.update(state="cancelled", finished=utc_now(), worker=None)
    return changes


def pause(record: JobRecord, now: float, lease_s: float) -> Changes:
    """A queued job (or one whose worker is gone) is paused at once; a running one is asked to save its
    state and stop. Pausing a paused job changes nothing. JobConflict for a job that has already ended."""
    if record.final:
        raise JobConflict(f"job {record.id} has already {record.state}; there is nothing to pause")
    if record.state == "paused":
        return {}
    if record.state == "queued" or lease_expired(record, now, lease_s * 2):
        return paused(record) or {}
    return {"pause_requested": True}


def paused(record: JobRecord) -> Changes | None:
    """running (or queued) -> paused, the worker freed; the start does not count as an attempt. None when
    the job already ended."""
    if record.final:
        return None
    attempts = max(0, record.attempts - 1) if record.state == "running" else record.attempts
    return {"state": "paused", "pause_requested": False, "worker": None, "heartbeat_at": None, "attempts": attempts}


def resume(record: JobRecord) -> Changes:
    """paused -> queued, for the next free worker, which goes on from the saved state. A job asked to pause that
    has not yet paused keeps running. JobConflict for a job that is neither paused nor pausing."""
    if record.state == "paused":
        return {"state": "queued", "pause_requested": False}
    if record.pause_requested and not record.final:
        return {"pause_requested": False}
    raise JobConflict(f"job {record.id} is {record.state}, not paused; only a paused job can be resumed")


def stop_request(record: JobRecord) -> str | None:
    """What the job's worker is asked to do: "cancel", "pause", or None (go on)."""
    if record.cancel_requested:
        return "cancel"
    return "pause" if record.pause_requested else None


def paused_event_data(record: JobRecord) -> dict[str, Any]:
    return {"state": "paused", "saved_epoch": record.saved_epoch, "saved_step": record.saved_step}
