"""The worker's errors, and the words a failed job shows its user."""

from __future__ import annotations

import signal

from lm.errors import CheckpointError, ConfigError, CorpusError, ModelNotFound, TextgenError

EXIT_FINISHED = 0  # the job's final state is recorded (or its claim was lost: another worker has it)
EXIT_HANDED_BACK = 75  # EX_TEMPFAIL: stopped by SIGTERM; the runner hands the job back to the queue
EXIT_PARENT_GONE = 76  # the worker that started it is gone; a new worker resumes the job

OOM_ADVICE = "lower batch_size, seq_len, hidden_dim or layers, or give the worker more memory"


class WorkerError(TextgenError):
    """Base class of the worker's own errors."""


class JobFailed(WorkerError):
    """The job cannot succeed; the message says why, for the user who submitted it."""


class LeaseLost(WorkerError):
    """Another worker took this job over (this one was silent too long); stop without publishing."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe_failure(exc: BaseException) -> str:
    """A sentence the user can act on; unexpected errors point at the worker's log."""
    if isinstance(exc, CorpusError | ConfigError | CheckpointError | ModelNotFound | JobFailed):
        return str(exc)
    if is_out_of_memory(exc):
        return f"out of memory while training; {OOM_ADVICE}"
    if isinstance(exc, TextgenError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); the worker's log has the details"


def describe_exit(code: int) -> str:
    """Why a training process ended without recording an outcome (a negative code is a signal)."""
    if code == -signal.SIGKILL:
        return f"the training process was killed (SIGKILL), most likely out of memory; {OOM_ADVICE}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the training process was killed by {name}; the worker's log has the details"
    return f"the training process exited with status {code}; the worker's log has the details"
