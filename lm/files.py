"""Durable file writes: the one way textgen replaces a file, and makes a new folder entry last.

Every file that another process may read while it changes (the active pointer, a job record, a
job's corpus, the resumable training state) is written through `atomic_write`: into a temporary
file beside the target, under a name no other writer uses, fsynced, renamed over the target, then
the folder fsynced so that the rename survives a crash. A reader sees the old file or the new one,
never half of either; a failed write leaves the target as it was and no temporary file behind.
A checkpoint, which is a whole folder, is renamed into place the same way (lm/checkpoint.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: Path, data: bytes | Callable[[Path], object]) -> None:
    """Replace `target` with `data`, or with what `data(path)` writes at the temporary path it is given."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            data(tmp)
            fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left by a write that failed
    fsync(target.parent)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (POSIX: a rename is durable once its folder is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
