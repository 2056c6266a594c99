"""Each job's bulky files, kept in the shared models folder (never in Redis):

    models/jobs/<job_id>/
        corpus.txt       the training text, written by the API at submit time
        validation.txt   the validation text, when the job has its own (else the corpus's tail validates)
        state/           per-epoch resumable training state (lm/train/state.py)
        job.json         the record (FileStore only)
        events.jsonl     the event log (FileStore only)

When the job ends, the corpus, the validation text and the state go, and so does the folder where they were all it
held (with Redis); the file store's record and events stay.

The model a job publishes has an id fixed at submit time (`params["name"]`), and the training
section of its config.json carries the job id: publication is idempotent, so a job that is run
twice (its first worker was killed after publishing) still publishes exactly one model.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from jobs.records import validate_job_id
from lm.files import atomic_write

JOBS_DIR = "jobs"
CORPUS_FILE = "corpus.txt"
VALIDATION_FILE = "validation.txt"
STATE_DIR = "state"


def job_dir(models_dir: Path, job_id: str) -> Path:
    return Path(models_dir) / JOBS_DIR / validate_job_id(job_id)


def corpus_path(models_dir: Path, job_id: str) -> Path:
    return job_dir(models_dir, job_id) / CORPUS_FILE


def state_path(models_dir: Path, job_id: str) -> Path:
    return job_dir(models_dir, job_id) / STATE_DIR


def validation_path(models_dir: Path, job_id: str) -> Path:
    return job_dir(models_dir, job_id) / VALIDATION_FILE


def write_corpus(models_dir: Path, job_id: str, text: str) -> Path:
    """models/jobs/<id>/corpus.txt, written beside and renamed, so a worker never reads half of it."""
    return _write(models_dir, job_id, CORPUS_FILE, text)


def write_validation(models_dir: Path, job_id: str, text: str) -> Path:
    """models/jobs/<id>/validation.txt: the job's own validation text. Write it before `JobStore.submit`
    queues the job, so a worker that takes the job finds it (the worker validates on it when it is there)."""
    return _write(models_dir, job_id, VALIDATION_FILE, text)


def _write(models_dir: Path, job_id: str, name: str, text: str) -> Path:
    """Written beside and renamed, so a worker never reads half of it."""
    folder = job_dir(models_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    atomic_write(target, text.encode("utf-8"))
    return target


def remove_job_files(models_dir: Path, job_id: str) -> None:
    """Free the corpus and the training state of an ended job, and its folder once nothing else is in it.

    With Redis that is the whole folder; the file store keeps the record and the events there, so
    its folder stays, as the job's history does."""
    folder = job_dir(models_dir, job_id)
    (folder / CORPUS_FILE).unlink(missing_ok=True)
    (folder / VALIDATION_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (the file store's record and events), or already gone
        folder.rmdir()
