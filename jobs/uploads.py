"""Training files uploaded through `POST /v1/files`, kept in the shared models folder so that every
API replica serves them:

    models/files/<file_id>/
        content          the bytes as uploaded
        file.json        the file object (id, bytes, created_at, filename, purpose, status, format)

A file is validated before anything is written (lm/formats.py: the caller refuses a bad one), then
written into a temporary folder beside its target and renamed into place: a reader sees a whole
file or none, and a failed write leaves nothing behind. A delete renames the folder away first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lm.files import atomic_write, fsync

FILES_DIR = "files"
CONTENT = "content"
META = "file.json"
FILE_ID_RE = re.compile(r"file-[0-9]{17}-[0-9a-f]{6}")


class UploadNotFound(LookupError):
    """No file with that id (or an id that is not one)."""


def new_file_id() -> str:
    """Sortable by creation time, as job ids are: file-<YYYYmmddHHMMSS><milliseconds>-<6 hex>."""
    now = datetime.now(UTC)
    return f"file-{now:%Y%m%d%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


class Uploads:
    """The uploaded files under models/files/."""

    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir) / FILES_DIR

    def _dir(self, file_id: str) -> Path:
        if not isinstance(file_id, str) or not FILE_ID_RE.fullmatch(file_id):
            raise UploadNotFound(f"no file {file_id!r}: file ids look like file-20250101120000123-3fa9c1")
        return self.root / file_id

    def save(self, data: bytes, *, filename: str, purpose: str, data_format: str) -> dict[str, Any]:
        """Store a validated file; returns its object. OSError (a disk fault) leaves nothing behind."""
        file_id = new_file_id()
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "format": data_format,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{file_id}"
        try:
            tmp.mkdir()
            atomic_write(tmp / CONTENT, data)
            atomic_write(tmp / META, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            os.rename(tmp, self._dir(file_id))
            fsync(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left by a write that failed
        return meta

    def get(self, file_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self._dir(file_id) / META).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UploadNotFound(f"no file {file_id!r}") from None

    def content(self, file_id: str) -> bytes:
        try:
            return (self._dir(file_id) / CONTENT).read_bytes()
        except FileNotFoundError:
            raise UploadNotFound(f"no file {file_id!r}") from None

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every file, oldest first (ids sort by creation time)."""
        if not self.root.is_dir():
            return []
        found = []
        for file_id in sorted(p.name for p in self.root.iterdir() if FILE_ID_RE.fullmatch(p.name)):
            try:
                meta = self.get(file_id)
            except (UploadNotFound, json.JSONDecodeError):
                continue  # deleted meanwhile
            if purpose is None or meta.get("purpose") == purpose:
                found.append(meta)
        return found

    def delete(self, file_id: str) -> None:
        """Remove a file: renamed away first, so no reader sees half of one."""
        folder = self._dir(file_id)
        doomed = self.root / f".deleting-{file_id}-{secrets.token_hex(2)}"
        try:
            os.rename(folder, doomed)
        except FileNotFoundError:
            raise UploadNotFound(f"no file {file_id!r}") from None
        shutil.rmtree(doomed, ignore_errors=True)
