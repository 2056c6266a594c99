"""The job system's errors. Each message is a sentence a user can act on."""

from __future__ import annotations

from lm.errors import TextgenError


class JobNotFound(TextgenError, KeyError):
    """No training job with this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class JobConflict(TextgenError):
    """The job is in a state that does not allow this (e.g. cancelling a finished job)."""


class StoreUnavailable(TextgenError):
    """Redis cannot be reached; the operation can be retried once it is back."""
