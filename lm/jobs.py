"""Training jobs: the record the API and the workers share, and the two places it can live.

A job goes `queued -> running -> succeeded | failed | cancelled`; a running job whose worker
stops (SIGTERM) goes back to `queued`, and one whose worker dies is claimed again by another
worker and resumes from its last saved epoch. Everything here is JSON: records, events, the
queue's payloads. Nothing is pickled.

    lm/job_files.py  FileStore, embedded mode (no Redis): models/jobs/<id>/job.json (atomic
                     replace, flock'ed) and events.jsonl; the queue is the records in state `queued`.
    lm/job_redis.py  RedisStore, Redis mode: a hash per job, a stream of events per job, and one
                     queue stream read by the workers through a consumer group (docs/TRAINING.md
                     says why Redis Streams and not RQ).

This module is the contract: the record, the events, the `JobStore` interface, the paths.

Both keep each job's bulky files in the shared models folder, never in Redis:

    models/jobs/<job_id>/
        corpus.txt       the training text, written by the API at submit time
        state/           per-epoch resumable training state (lm.train's state_dir)
        job.json         the record (FileStore only)
        events.jsonl     the event log (FileStore only)

The model a job publishes has an id fixed at submit time (`params["name"]`), and the training
section of its config.json carries the job id: publication is idempotent, so a job that is run
twice (its first worker was killed after publishing) still publishes exactly one model.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lm.errors import TextgenError

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
FINAL_EVENTS = {"succeeded": "done", "failed": "failed", "cancelled": "cancelled"}
JOB_ID_RE = re.compile(r"job-[0-9]{17}-[0-9a-f]{6}")
JOBS_DIR = "jobs"
CORPUS_FILE = "corpus.txt"
STATE_DIR = "state"
DEFAULT_LEASE_S = 30.0  # a running job whose worker is silent this long is claimed by another worker
MAX_ATTEMPTS = 3  # starts that ended with the worker dying; then the job fails


class JobNotFound(TextgenError, KeyError):
    """No training job with this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class JobConflict(TextgenError):
    """The job is in a state that does not allow this (e.g. cancelling a finished job)."""


class StoreUnavailable(TextgenError):
    """Redis cannot be reached; the operation can be retried once it is back."""


# ---------------------------------------------------------------------------- records


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
    heartbeat_at: float | None = None  # unix time of the running worker's last heartbeat
    # internal: the active model id when the job first started ("" = none, None = not recorded);
    # the publish is a compare-and-set against it, so a newer promotion is never overwritten
    active_at_start: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class JobEvent:
    """One entry of a job's event log; `id` is opaque and increasing (an SSE `id:`)."""

    id: str
    kind: str  # queued | started | progress | epoch | checkpoint | requeued | published | done | failed | cancelled
    data: dict[str, Any] = field(default_factory=dict)


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


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def job_dir(models_dir: Path, job_id: str) -> Path:
    return Path(models_dir) / JOBS_DIR / validate_job_id(job_id)


def corpus_path(models_dir: Path, job_id: str) -> Path:
    return job_dir(models_dir, job_id) / CORPUS_FILE


def state_path(models_dir: Path, job_id: str) -> Path:
    return job_dir(models_dir, job_id) / STATE_DIR


def write_corpus(models_dir: Path, job_id: str, text: str) -> Path:
    """models/jobs/<id>/corpus.txt, written beside and renamed, so a worker never reads half of it."""
    folder = job_dir(models_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CORPUS_FILE
    atomic_write_bytes(target, text.encode("utf-8"))
    return target


def remove_job_files(models_dir: Path, job_id: str) -> None:
    """Free the corpus and the training state of a finished job (the record and events stay)."""
    folder = job_dir(models_dir, job_id)
    (folder / CORPUS_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the interface


class JobStore(Protocol):
    """Where job records, events and the queue live. The API uses the first half, workers the second."""

    models_dir: Path

    # -- the API's side
    def submit(self, params: dict[str, Any], text: str, job_id: str | None = None) -> JobRecord: ...
    def get(self, job_id: str) -> JobRecord: ...
    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]: ...
    def cancel(self, job_id: str) -> JobRecord: ...
    def events(self, job_id: str, after: str | None = None, block_s: float = 0.0) -> list[JobEvent]: ...
    def queue_position(self, job_id: str) -> int | None: ...
    def ping(self) -> None: ...

    # -- the workers' side
    def claim(self, worker: str, block_s: float) -> Claim | None: ...
    def start(self, claim: Claim) -> JobRecord | None: ...
    def heartbeat(self, claim: Claim) -> bool: ...
    def update(self, job_id: str, **values: Any) -> None: ...
    def set_once(self, job_id: str, name: str, value: Any) -> Any: ...
    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def finish(self, claim: Claim, state: str, **values: Any) -> bool: ...
    def hand_back(self, claim: Claim, reason: str) -> bool: ...
    def release(self, worker: str) -> None: ...
    def spec(self) -> dict[str, Any]: ...


def open_store(spec: dict[str, Any]) -> JobStore:
    """Rebuild a store from `store.spec()` (how a worker hands its store to a job's child process)."""
    if spec["kind"] == "file":
        from lm.job_files import FileStore

        return FileStore(Path(spec["models_dir"]), lease_s=spec.get("lease_s", DEFAULT_LEASE_S))
    if spec["kind"] == "redis":
        from lm.job_redis import RedisStore, connect_redis

        return RedisStore(
            connect_redis(spec["url"]),
            Path(spec["models_dir"]),
            prefix=spec.get("prefix", "textgen:"),
            lease_s=spec.get("lease_s", DEFAULT_LEASE_S),
        )
    raise ValueError(f"unknown job store kind {spec['kind']!r}")


def final_event_data(record: JobRecord) -> dict[str, Any]:
    return {
        "state": record.state,
        "model_id": record.model_id,
        "activated": record.activated,
        "metrics": record.metrics,
        "error": record.error,
        "note": record.note,
    }


# ---------------------------------------------------------------------------- planning


def planned_parameters(params: dict[str, Any], text: str, base_architecture: dict[str, Any] | None = None) -> int:
    """The parameter count of the model a job will train, from its hyperparameters and corpus.

    The vocabulary is estimated as the tokenizer would fit it: char = distinct characters + <unk>,
    word = distinct words + <unk>, bpe = vocab_size (default 1024); vocab_size caps each.
    """
    from lm.tokenizers import WORD_RE

    arch = dict(base_architecture or {})
    if not arch:
        kind = params.get("tokenizer", "char")
        cap = params.get("vocab_size")
        if kind == "char":
            vocab = len(set(text)) + 1
        elif kind == "word":
            vocab = len(set(WORD_RE.findall(text))) + 1
        else:
            vocab = 1024
        arch = {
            "vocab_size": min(vocab, cap) if cap else vocab,
            "embedding_dim": params.get("embedding_dim", 512),
            "hidden_dim": params.get("hidden_dim", 512),
            "layers": params.get("layers", 2),
            "tie_weights": params.get("tie_weights", False),
        }
    v, e, h, n = arch["vocab_size"], arch["embedding_dim"], arch["hidden_dim"], arch["layers"]
    # nn.LSTM layer l: W_ih (4H, in), W_hh (4H, H), two biases (4H) each; in = E for l=0, else H
    lstm = sum(4 * h * ((e if layer == 0 else h) + h) + 8 * h for layer in range(n))
    head = v if arch.get("tie_weights") else h * v + v  # a tied head shares the embedding; keeps its bias
    return v * e + lstm + head


def claimable(record: JobRecord, now: float, lease_s: float) -> bool:
    """Queued and not taken by a live worker, or running with a worker that has gone silent."""
    if record.state not in ("queued", "running"):
        return False
    return record.worker is None or record.heartbeat_at is None or now - record.heartbeat_at > lease_s


def lease_expired(record: JobRecord, now: float, lease_s: float) -> bool:
    return record.state == "running" and (record.heartbeat_at is None or now - record.heartbeat_at > lease_s)
