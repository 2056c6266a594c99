"""OpenAI's Files API for training data: upload, list, show, download and delete. Admin key when keys
are configured.

A file is validated as it is uploaded (lm/formats.py: plain text, chat JSONL or prompt/completion
JSONL); a bad one is answered 400 naming its first bad line, and nothing is stored. A stored file is
`processed` at once. Files live in the models folder (jobs/uploads.py), so every replica serves them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from app.auth import require_admin_key
from app.deps import SettingsDep
from app.errors import ApiError, BodyLimit, error_responses, storage_error
from app.fine_tuning_schemas import FileDeleted, FileList, FileObject
from app.settings import Settings
from jobs.uploads import UploadNotFound, Uploads
from lm.formats import FormatError, validate

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/files",
    tags=["files"],
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 500, 503, 507),
)

PURPOSES = ("fine-tune",)
FORM_OVERHEAD_BYTES = 1_000_000  # the multipart framing and the `purpose` field, beside the file
UPLOAD_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                    },
                }
            }
        }
    }
}


def body_limit(settings: Settings) -> BodyLimit:
    """The most bytes a POST /v1/files body may have: the file limit plus the form's framing."""
    limit = settings.max_file_bytes + FORM_OVERHEAD_BYTES
    return BodyLimit(limit, f"the upload is larger than TEXTGEN_MAX_FILE_BYTES={settings.max_file_bytes} bytes")


def uploads(request: Request) -> Uploads:
    return Uploads(request.app.state.settings.models_dir)


def not_found(e: UploadNotFound) -> ApiError:
    return ApiError(404, str(e), param="file_id", code="file_not_found")


@router.post("", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, settings: SettingsDep) -> FileObject:
    """Upload a training file (multipart `file` and `purpose`); validated at once: 400 names its first bad line."""
    filename, data, purpose = await _read_form(request, settings)
    try:
        data_format = await asyncio.to_thread(validate, data)
    except FormatError as e:
        raise ApiError(
            400, f"{filename!r} is not valid training data: {e}", param="file", code="invalid_file"
        ) from None
    try:
        meta = await asyncio.to_thread(
            uploads(request).save, data, filename=filename, purpose=purpose, data_format=data_format
        )
    except OSError as e:
        error = storage_error(e, "the file was not stored")
        if error is None:
            raise
        log.error("upload %r: %s (%s)", filename, error.message, e)
        raise error from None
    log.info("stored file %s (%r, %d bytes, %s)", meta["id"], filename, len(data), data_format)
    return FileObject(**meta)


async def _read_form(request: Request, settings: Settings) -> tuple[str, bytes, str]:
    """(file name, bytes, purpose) of the multipart form; BodyLimitMiddleware has refused a larger body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise ApiError(
            415, "send the file as multipart/form-data (`file` and `purpose`)", code="unsupported_media_type"
        )
    async with request.form(max_files=1, max_fields=8, max_part_size=FORM_OVERHEAD_BYTES) as form:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            allowed = ", ".join(PURPOSES)
            raise ApiError(400, f"purpose must be one of: {allowed} (got {purpose!r})", param="purpose")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "send the file's bytes as the form field `file`", param="file")
        if upload.size is not None and upload.size > settings.max_file_bytes:
            limit = settings.max_file_bytes
            raise ApiError(
                413,
                f"the file has {upload.size:,} bytes; TEXTGEN_MAX_FILE_BYTES allows {limit:,}",
                param="file",
                code="file_too_large",
            )
        return (upload.filename or "upload")[:255], await upload.read(), purpose


@router.get("", response_model=FileList)
async def list_files(
    request: Request,
    purpose: str | None = Query(None, description="only files of this purpose"),
    after: str | None = Query(None, description="the id of the last file of the previous page"),
    limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = Query("desc", description="by creation time"),
) -> FileList:
    """The uploaded files, newest first (`order=asc`: oldest first), paged with `after`."""
    found = await asyncio.to_thread(uploads(request).list, purpose)
    if order == "desc":
        found.reverse()
    page, has_more = page_after(found, after, limit, descending=order == "desc")
    data = [FileObject(**meta) for meta in page]
    return FileList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


def page_after(
    items: list[dict[str, Any]], after: str | None, limit: int, *, descending: bool
) -> tuple[list[dict[str, Any]], bool]:
    """The `limit` items that follow the one whose id is `after` (from the first without it), and whether
    more follow. Ids sort by creation time, so an `after` deleted meanwhile still marks its place."""
    start = 0
    if after is not None:
        start = next(
            (i for i, item in enumerate(items) if (item["id"] < after if descending else item["id"] > after)),
            len(items),
        )
    return items[start : start + limit], start + limit < len(items)


@router.get("/{file_id}", response_model=FileObject)
async def get_file(file_id: str, request: Request) -> FileObject:
    """One file's object."""
    try:
        return FileObject(**await asyncio.to_thread(uploads(request).get, file_id))
    except UploadNotFound as e:
        raise not_found(e) from None


@router.get(
    "/{file_id}/content", response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}}
)
async def file_content(file_id: str, request: Request) -> Response:
    """The file's bytes, as uploaded."""
    try:
        data = await asyncio.to_thread(uploads(request).content, file_id)
    except UploadNotFound as e:
        raise not_found(e) from None
    return Response(data, media_type="application/octet-stream")


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete a file. A job already created from it keeps its own copy of the text."""
    try:
        await asyncio.to_thread(uploads(request).delete, file_id)
    except UploadNotFound as e:
        raise not_found(e) from None
    return FileDeleted(id=file_id, deleted=True)
