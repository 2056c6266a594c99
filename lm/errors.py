"""Domain errors of the language-model core. Each message is a sentence a user can act on.

A message may reach an API client, so it names no server path, address or library exception text;
those go in `detail`, which only the log and the command line show.
"""

from __future__ import annotations


class TextgenError(Exception):
    """Base class of every error textgen raises on purpose."""

    def __init__(self, *args: object, detail: str | None = None) -> None:
        super().__init__(*args)
        self.detail = detail  # for the log only: paths, addresses, the underlying exception's text


class CorpusError(TextgenError, ValueError):
    """The training or evaluation text cannot be used (missing, empty, binary, too short)."""


class ConfigError(TextgenError, ValueError):
    """A hyperparameter or sampling parameter is out of bounds; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, *, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.param = param


class CheckpointError(TextgenError):
    """A checkpoint folder is truncated, mismatched or incomplete; the message names the file."""


class InvalidModelId(TextgenError, ValueError):
    """A model id that does not match the allowed pattern (it never touches a path)."""


class ModelNotFound(TextgenError, KeyError):
    """No checkpoint with this id exists in the models folder."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "model not found"


class AliasNotFound(TextgenError, KeyError):
    """No alias of this name exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "alias not found"


class ActiveModelError(TextgenError):
    """The operation would remove the model that is currently active."""


class PromotionConflict(TextgenError):
    """A compare-and-set of the active pointer lost against a newer promotion."""


class TrainingCancelled(TextgenError):
    """Training observed a cancellation request and stopped without publishing."""
