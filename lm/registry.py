"""The model registry: the checkpoints in a models folder plus the active pointer.

The active model id lives in one place, behind `ActivePointer`: the file models/ACTIVE
here (embedded mode), a Redis key in Redis mode. Promotion is compare-and-set, so a
training job that finishes late cannot overwrite a newer promotion.

    models/
        ACTIVE              the active model id (one line)
        .lock               flock'ed around every compare-and-set of ACTIVE
        <model_id>/         one checkpoint each (lm/checkpoint.py)
        jobs/               training jobs' resumable state, never listed
        files/              files uploaded through /v1/files (jobs/uploads.py), never listed
        .tmp-*/             checkpoints being written, never listed
"""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from lm.checkpoint import (
    RESERVED_IDS,
    Checkpoint,
    load_checkpoint,
    read_config,
    save_checkpoint,
    validate_model_id,
)
from lm.errors import ActiveModelError, CheckpointError, InvalidModelId, ModelNotFound, PromotionConflict
from lm.files import atomic_write
from lm.model import LSTMLanguageModel
from lm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

ACTIVE_FILE = "ACTIVE"
LOCK_FILE = ".lock"


class _Unset:
    """Marks "no expected value given" (None means "expect no active model")."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


class ActivePointer(Protocol):
    def get(self) -> str | None: ...

    def read(self) -> str | None:
        """Like get(), but raises instead of answering a cached value when the store is unreachable."""
        ...

    def compare_and_set(self, expected: str | None, new: str) -> bool: ...


class FilePointer:
    """models/ACTIVE, replaced atomically, with compare-and-set under an flock on models/.lock."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.file = self.models_dir / ACTIVE_FILE

    def get(self) -> str | None:
        # No lock: os.replace() means a reader sees the old id or the new one, never half a line.
        try:
            text = self.file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return validate_model_id(text)
        except InvalidModelId:
            log.warning("%s holds %r, which is not a model id; treating as no active model", self.file, text)
            return None

    def read(self) -> str | None:
        return self.get()  # the file is never stale

    def compare_and_set(self, expected: str | None, new: str) -> bool:
        """Point ACTIVE at `new` if it still points at `expected`; False when another writer got there first."""
        validate_model_id(new)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.models_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if self.get() != expected:
                return False
            self._write(new)
        return True

    def _write(self, model_id: str) -> None:
        atomic_write(self.file, (model_id + "\n").encode("utf-8"))


@dataclass
class ModelInfo:
    """What a listing shows about one checkpoint, read from its config.json only."""

    model_id: str
    path: Path
    created_at: str
    parameters: int
    tokenizer: dict  # {"kind", "vocab_size"}
    metrics: dict
    training: dict
    active: bool
    size_bytes: int
    config: dict = field(default_factory=dict, repr=False)  # the whole config.json (architecture, chat_template...)


@dataclass(frozen=True)
class Unreadable:
    """A folder of the models folder that is not a checkpoint the registry can read, and why."""

    name: str
    reason: str  # names files relative to the models folder (lm/checkpoint.py), never its path


class Registry:
    def __init__(self, models_dir: Path, pointer: ActivePointer | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.pointer: ActivePointer = pointer if pointer is not None else FilePointer(self.models_dir)

    def path(self, model_id: str) -> Path:
        return self.models_dir / validate_model_id(model_id)

    def active_id(self) -> str | None:
        return self.pointer.get()

    def list(self) -> list[ModelInfo]:
        """Every valid checkpoint, newest first; temporary, reserved and broken folders are skipped."""
        return self.scan()[0]

    def scan(self) -> tuple[builtins.list[ModelInfo], builtins.list[Unreadable]]:  # `list` is a method here
        """Every valid checkpoint, newest first, and every other folder that looks like one, with why it
        cannot be read (a name that is not a model id, a missing or broken config.json). Temporary and
        reserved folders are neither."""
        if not self.models_dir.is_dir():
            return [], []
        active = self.active_id()
        infos, unreadable = [], []
        for entry in self.models_dir.iterdir():
            if entry.name.startswith(".") or entry.name in RESERVED_IDS or not entry.is_dir():
                continue
            try:
                infos.append(self._info(validate_model_id(entry.name), active))
            except InvalidModelId:
                unreadable.append(Unreadable(entry.name, "the folder's name is not a model id"))
            except CheckpointError as e:
                unreadable.append(Unreadable(entry.name, str(e)))
                log.debug("skipping %s: %s", entry, e.detail or e)
        infos.sort(key=lambda i: (i.created_at, i.model_id), reverse=True)
        return infos, sorted(unreadable, key=lambda u: u.name)

    def get(self, model_id: str) -> ModelInfo:
        """ModelNotFound for an unknown id; CheckpointError for a folder that is not a valid checkpoint."""
        if not self.path(model_id).is_dir():
            raise ModelNotFound(f"no model named {model_id!r}", detail=f"in {self.models_dir}")
        return self._info(model_id, self.active_id())

    def _info(self, model_id: str, active: str | None) -> ModelInfo:
        path = self.models_dir / model_id
        config = read_config(path)
        return ModelInfo(
            model_id=model_id,
            path=path,
            created_at=str(config["created_at"]),
            parameters=int(config["parameters"]),
            tokenizer=config["tokenizer"],
            metrics=config["metrics"],
            training=config["training"],
            active=model_id == active,
            size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
            config=config,
        )

    def activate(self, model_id: str, expected: str | None | _Unset = UNSET) -> None:
        """Make `model_id` active. With `expected`, only if the active id is still that (else PromotionConflict)."""
        self.get(model_id)  # ModelNotFound / CheckpointError before the pointer moves
        if isinstance(expected, _Unset):
            while not self.pointer.compare_and_set(self.active_id(), model_id):
                pass  # lost to a concurrent promotion; last writer wins
        elif not self.pointer.compare_and_set(expected, model_id):
            raise PromotionConflict(
                f"not activating {model_id!r}: the active model is now {self.active_id()!r}, "
                f"not the expected {expected!r}"
            )
        log.info("activated model %s", model_id)

    def publish(
        self,
        model: LSTMLanguageModel,
        tokenizer: Tokenizer,
        *,
        model_id: str | None = None,
        training: dict,
        metrics: dict,
        activate: bool = False,
        expected_active: str | None | _Unset = UNSET,
        chat_template: dict | None = None,
    ) -> str:
        """Save a new checkpoint (an id is made up when none is given) and optionally activate it.

        When the activation loses its compare-and-set, PromotionConflict is raised and the
        checkpoint stays published but inactive.
        """
        for attempt in range(5):
            new_id = model_id or self.unique_id(_default_base(tokenizer))
            try:
                save_checkpoint(
                    self.models_dir,
                    new_id,
                    model,
                    tokenizer,
                    training=training,
                    metrics=metrics,
                    chat_template=chat_template,
                )
                break
            except CheckpointError:
                # A made-up id can be taken by a concurrent publish between unique_id() and the rename.
                if model_id is not None or not self.path(new_id).exists() or attempt == 4:
                    raise
        if activate:
            self.activate(new_id, expected_active)
        return new_id

    def delete(self, model_id: str) -> None:
        """Remove a checkpoint; ActiveModelError for the active one, ModelNotFound for an unknown one."""
        path = self.path(model_id)
        if not path.is_dir():
            raise ModelNotFound(f"no model named {model_id!r}", detail=f"in {self.models_dir}")
        self._refuse_active(model_id)
        # Rename first: readers see the whole checkpoint or no folder, never a half-deleted one.
        doomed = self.models_dir / f".tmp-deleting-{model_id}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        if self.active_id() == model_id:  # activated between the check and the rename
            os.rename(doomed, path)
            self._refuse_active(model_id)
        shutil.rmtree(doomed)
        log.info("deleted model %s", model_id)

    def _refuse_active(self, model_id: str) -> None:
        if self.pointer.read() == model_id:  # a fresh read: never delete on a stale answer
            raise ActiveModelError(f"{model_id!r} is the active model; activate another model before deleting it")

    def load(self, model_id: str | None = None) -> Checkpoint:
        """Load a checkpoint (None = the active one); ModelNotFound when there is no such model."""
        if model_id is None:
            model_id = self.active_id()
            if model_id is None:
                raise ModelNotFound("no model is active; activate or train one first", detail=f"in {self.models_dir}")
        path = self.path(model_id)
        if not path.is_dir():
            raise ModelNotFound(f"no model named {model_id!r}", detail=f"in {self.models_dir}")
        return load_checkpoint(path)

    def unique_id(self, base: str) -> str:
        """`base` made into a valid id, then base, base-2, base-3 ... whichever is not taken yet."""
        base = _slug(base)
        candidate, n = base, 1
        while candidate in RESERVED_IDS or (self.models_dir / candidate).exists():
            n += 1
            candidate = f"{base}-{n}"
        return candidate


def _slug(text: str) -> str:
    """Lower-case, invalid characters to '-', no '..', short enough to take a '-N' suffix."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    slug = re.sub(r"\.{2,}", ".", slug).lstrip("._-")[:56].rstrip("._-")
    return slug or "model"


def _default_base(tokenizer: Tokenizer) -> str:
    return f"lstm-{tokenizer.kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
