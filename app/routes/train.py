"""Training jobs: submit, list, show, follow (SSE), cancel, pause and resume. Admin key when keys are configured.

The route validates everything it can before queueing (corpus, bounds, model size, name), so
a job that fails later fails for a reason only training can find (out of memory, divergence).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.sse import format_sse_event
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app import sse
from app.auth import require_admin_key
from app.bodies import parse_json_body
from app.deps import SettingsDep
from app.errors import ApiError, BodyLimit, error_responses, storage_error
from app.settings import Settings
from app.train_schemas import JobState, TrainJobCreate, TrainJobList, TrainJobPublic
from app.training import Training, TrainingDep, training_lifespan
from jobs.errors import JobConflict, JobNotFound, StoreUnavailable
from jobs.files import job_dir, write_validation
from jobs.records import FINAL_EVENTS, JobRecord, new_job_id, validate_job_id
from lm.checkpoint import validate_model_id
from lm.data import check_text, decode_corpus, read_corpus
from lm.errors import CorpusError, InvalidModelId, ModelNotFound
from lm.formats import DataFormat, FormatError, detect, segments, validate_text
from lm.train import TrainConfig, planned_parameters

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/train",
    tags=["training"],
    dependencies=[Depends(require_admin_key)],
    lifespan=training_lifespan,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 500, 503, 507),
)

# POST /train's body limit (app/main.py gives it to BodyLimitMiddleware instead of
# TEXTGEN_MAX_BODY_BYTES): a JSON string may escape the corpus into up to twice its UTF-8 size
# ("\n" for a newline, a 6-byte "\uXXXX" for a 3-byte CJK character), plus room for the other
# fields and the multipart framing. The corpus itself is held to TEXTGEN_MAX_CORPUS_BYTES.
BODY_OVERHEAD_BYTES = 1_000_000
CORPUS_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
EVENT_POLL_S = 0.5
SUBMIT_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": TrainJobCreate.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "description": "`file` (UTF-8 text) plus any field of the JSON body as a form field",
                }
            },
        }
    }
}


# ---------------------------------------------------------------------------- submit


@router.post("", status_code=202, response_model=TrainJobPublic, openapi_extra=SUBMIT_BODY)
async def create_job(
    request: Request, response: Response, training: TrainingDep, settings: SettingsDep
) -> TrainJobPublic:
    """Queue a training job on a corpus (inline `text`, a shipped `corpus`, or an uploaded `file`)."""
    body, upload = await read_submission(request, settings)
    text, corpus_name = await resolve_corpus(body, upload, settings)
    job_id = new_job_id()
    params = await asyncio.to_thread(plan_job, body, text, corpus_name, job_id, training, settings)
    record = await asyncio.to_thread(store_job, training, params, text, job_id, settings, body.validation_text)
    training.ensure_local_worker()
    log.info("queued training job %s for model %s (%d parameters)", job_id, params["name"], params["parameters"])
    response.headers["Location"] = f"/train/{record.id}"
    return await public(training, record)


def store_job(
    training: Training,
    params: dict[str, Any],
    text: str,
    job_id: str,
    settings: Settings,
    validation_text: str | None = None,
) -> JobRecord:
    """Queue the job (its corpus, and its validation text if any, go to models/jobs/<id>/). A disk fault
    (full: 507; read-only or not ours to write: 503, app/errors.py) leaves nothing behind: the job's folder
    goes, half-written or not."""
    try:
        if validation_text is not None:
            write_validation(settings.models_dir, job_id, validation_text)
        return training.store.submit(params, text, job_id)
    except OSError as e:
        shutil.rmtree(job_dir(settings.models_dir, job_id), ignore_errors=True)
        error = storage_error(e, "the job was not queued")
        if error is None:
            raise
        log.error("training job %s: %s (%s)", job_id, error.message, e)
        raise error from None


def body_limit(settings: Settings) -> BodyLimit:
    """The most bytes a POST /train body may have: twice the corpus limit, plus the overhead."""
    limit = 2 * settings.max_corpus_bytes + BODY_OVERHEAD_BYTES
    return BodyLimit(
        limit,
        f"the request body is larger than {limit:,} bytes, the most POST /train takes for a corpus of "
        f"TEXTGEN_MAX_CORPUS_BYTES={settings.max_corpus_bytes} bytes",
    )


async def read_submission(request: Request, settings: Settings) -> tuple[TrainJobCreate, tuple[str, bytes] | None]:
    """The JSON body or the multipart form, and the uploaded file as (file name, bytes) if any.

    BodyLimitMiddleware has already refused a body over `body_limit(settings)`, declared or counted.
    """
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_form(request, settings)
    if content_type != "application/json":
        raise ApiError(415, "send application/json or multipart/form-data", code="unsupported_media_type")
    return parse_json_body(TrainJobCreate, await request.body()), None


def _too_large(size: int, settings: Settings) -> ApiError:
    limit = settings.max_corpus_bytes
    return ApiError(
        413,
        f"the corpus is too large ({size:,} bytes or more); TEXTGEN_MAX_CORPUS_BYTES allows {limit:,} bytes",
        param="text",
        code="corpus_too_large",
    )


async def _read_form(request: Request, settings: Settings) -> tuple[TrainJobCreate, tuple[str, bytes] | None]:
    """The form fields, and the file: the parser streams it into a temporary file (on disk past 1 MB),
    and it is read into memory only once it is known to be within TEXTGEN_MAX_CORPUS_BYTES."""
    part_limit = body_limit(settings).max_bytes  # a `text` form field: the corpus check below names the limit
    async with request.form(max_files=1, max_fields=64, max_part_size=part_limit) as form:
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str) and v != ""}
        try:
            body = TrainJobCreate.model_validate(fields, strict=False, context={"form": True})  # strings: "1" is 1
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return body, None
        if upload.size is not None and upload.size > settings.max_corpus_bytes:
            raise _too_large(upload.size, settings)
        return body, (upload.filename or "upload", await upload.read())


async def resolve_corpus(body: TrainJobCreate, upload: tuple[str, bytes] | None, settings: Settings) -> tuple[str, str]:
    """(the training text, a name for it); exactly one of `text`, `corpus`, `file`. The text is checked in its
    format (lm/formats.py: plain text, chat or prompt/completion JSONL): 422 naming the first bad line."""
    given = [name for name, value in (("text", body.text), ("corpus", body.corpus), ("file", upload)) if value]
    if len(given) != 1:
        raise ApiError(
            422, "give the corpus one way: `text`, `corpus` (a shipped corpus) or a `file` upload", param="text"
        )
    if upload is None and body.text is None:
        assert body.corpus is not None
        return await asyncio.to_thread(read_shipped_corpus, body.corpus, settings.data_dir), body.corpus
    if body.text is not None:
        size = len(body.text.encode("utf-8"))
        if size > settings.max_corpus_bytes:
            raise _too_large(size, settings)
    try:
        return await asyncio.to_thread(_checked_corpus, body.text, upload)  # off the event loop: 50 MB of JSONL
    except FormatError as e:
        message = f"the {given[0]} is not valid training data: {e}"
        raise ApiError(422, message, param=given[0], code="invalid_corpus") from None
    except CorpusError as e:
        raise ApiError(422, str(e), param=given[0], code="invalid_corpus") from None


def _checked_corpus(text: str | None, upload: tuple[str, bytes] | None) -> tuple[str, str]:
    """The inline text or the upload (within the limit: _read_form checked its size), decoded and validated
    in its format; CorpusError (FormatError: naming the first bad line) otherwise."""
    if upload is not None:
        filename, data = upload
        text = decode_corpus(data, f"the uploaded file {filename!r}")
        validate_text(text)
        return text, Path(filename).stem
    assert text is not None
    validate_text(check_text(text, "the text"))
    return text, "text"


def read_shipped_corpus(name: str, data_dir: Path) -> str:
    """data/<name>/<name>.txt; 422 naming the shipped corpora when there is no such one."""
    path = data_dir / name / f"{name}.txt"
    if not CORPUS_NAME_RE.fullmatch(name) or not path.is_file():
        shipped = (
            sorted(p.name for p in data_dir.iterdir() if (p / f"{p.name}.txt").is_file()) if data_dir.is_dir() else []
        )
        raise ApiError(
            422, f"no shipped corpus {name!r}; the shipped corpora are: {', '.join(shipped) or 'none'}", param="corpus"
        )
    return read_corpus(path)


def plan_job(
    body: TrainJobCreate, text: str, corpus_name: str, job_id: str, training: Training, settings: Settings
) -> dict[str, Any]:
    """The job's params, or a 4xx that says which field is wrong (runs in a thread: it reads the registry)."""
    hyper = {**body.given(), "data_format": _data_format(body, text)}
    cfg = TrainConfig.from_dict(hyper)
    cfg.validate()  # ConfigError -> 422 naming the field
    base = _base_architecture(body.base_model, training)
    rendered = "".join(piece for piece, _ in segments(text, cfg.data_format, None))  # chat: the transcript
    if base is None:
        _check_long_enough(rendered, cfg)
    parameters = planned_parameters(cfg, rendered, base)
    if parameters > settings.max_train_parameters:
        raise ApiError(
            422,
            f"the model would have {parameters:,} parameters; TEXTGEN_MAX_TRAIN_PARAMETERS allows "
            f"{settings.max_train_parameters:,}; lower hidden_dim, embedding_dim, layers or vocab_size",
            param="hidden_dim",
            code="model_too_large",
        )
    name = _model_name(body.name, corpus_name, job_id, training)
    return {
        **hyper,
        "name": name,
        "base_model": body.base_model,
        "activate": body.activate,
        "keep_checkpoints": settings.keep_checkpoints if body.keep_checkpoints is None else body.keep_checkpoints,
        "corpus_name": corpus_name,
        "corpus_bytes": len(text.encode("utf-8")),
        "parameters": parameters,
        **_validation_params(body.validation_text, cfg.data_format, settings),
    }


def _data_format(body: TrainJobCreate, text: str) -> DataFormat:
    """The corpus's format, detected (resolve_corpus has validated it); a given `data_format` must match."""
    detected = detect(text)
    if body.data_format is not None and body.data_format != detected:
        raise ApiError(
            422, f"data_format is {body.data_format!r}, but the corpus is {detected!r} data", param="data_format"
        )
    return detected


def _validation_params(validation_text: str | None, data_format: DataFormat, settings: Settings) -> dict[str, Any]:
    """{"validation_bytes": n} for a valid validation text in the corpus's format, {} without one."""
    if validation_text is None:
        return {}
    size = len(validation_text.encode("utf-8"))
    if size > settings.max_corpus_bytes:
        raise ApiError(
            413,
            f"the validation text is too large ({size:,} bytes); TEXTGEN_MAX_CORPUS_BYTES allows "
            f"{settings.max_corpus_bytes:,} bytes",
            param="validation_text",
            code="corpus_too_large",
        )
    try:
        found = validate_text(check_text(validation_text, "the validation text"))
    except CorpusError as e:
        raise ApiError(
            422, f"the validation_text is not valid: {e}", param="validation_text", code="invalid_corpus"
        ) from None
    if found != data_format:
        raise ApiError(
            422,
            f"the validation_text is {found!r} data, but the corpus is {data_format!r} data",
            param="validation_text",
            code="invalid_corpus",
        )
    return {"validation_bytes": size}


def _base_architecture(base_model: str | None, training: Training) -> dict[str, Any] | None:
    if base_model is None:
        return None
    try:
        return dict(training.registry.get(base_model).config["architecture"])
    except (ModelNotFound, InvalidModelId):
        raise ApiError(422, f"no model named {base_model!r} to fine-tune", param="base_model") from None


def _check_long_enough(text: str, cfg: TrainConfig) -> None:
    """Every tokenizer makes at most one token per character, so this is a sure failure, found early."""
    need = 2 * cfg.batch_size
    have = int(len(text) * (1 - cfg.val_fraction))
    if have < need:
        raise ApiError(
            422,
            f"the corpus is shorter than one batch: about {have} training characters, but batch_size "
            f"{cfg.batch_size} needs at least {need} tokens; give more text or lower batch_size",
            param="batch_size",
            code="invalid_corpus",
        )


def _model_name(name: str | None, corpus_name: str, job_id: str, training: Training) -> str:
    """The requested id (409 if a model or an unfinished job has it), else `<corpus>-<job suffix>`."""
    if name is None:
        return training.registry.unique_id(f"{corpus_name}-{job_id[-6:]}")
    try:
        validate_model_id(name)
    except InvalidModelId as e:
        raise ApiError(422, str(e), param="name") from None
    if training.registry.path(name).exists():
        raise ApiError(409, f"a model named {name!r} already exists; choose another name", param="name")
    for record in training.store.list_jobs(limit=1000):
        if not record.final and record.params.get("name") == name:
            raise ApiError(409, f"job {record.id} is already training a model named {name!r}", param="name")
    return name


# ---------------------------------------------------------------------------- read, cancel, pause, resume


async def public(training: Training, record: JobRecord) -> TrainJobPublic:
    position = await asyncio.to_thread(training.store.queue_position, record.id) if record.state == "queued" else None
    fields = {name: getattr(record, name) for name in TrainJobPublic.model_fields if hasattr(record, name)}
    return TrainJobPublic(**fields, queue_position=position)


async def get_record(training: Training, job_id: str) -> JobRecord:
    try:
        return await asyncio.to_thread(training.store.get, validate_job_id(job_id))
    except JobNotFound as e:
        raise ApiError(404, str(e), param="id", code="job_not_found") from None


@router.get("", response_model=TrainJobList)
async def list_jobs(
    training: TrainingDep,
    status: JobState | None = Query(None, description="only jobs in this state"),
    limit: int = Query(100, ge=1, le=1000),
) -> TrainJobList:
    """Training jobs, newest first."""
    records = await asyncio.to_thread(training.store.list_jobs, status, limit)
    return TrainJobList(jobs=[await public(training, r) for r in records])


@router.get("/{job_id}", response_model=TrainJobPublic)
async def get_job(job_id: str, training: TrainingDep) -> TrainJobPublic:
    """One job: state, progress, metrics, the published model, or why it failed."""
    return await public(training, await get_record(training, job_id))


@router.delete("/{job_id}", response_model=TrainJobPublic)
async def cancel_job(job_id: str, training: TrainingDep, response: Response) -> TrainJobPublic:
    """Cancel a queued job at once, or ask a running one to stop (within seconds; it publishes nothing)."""
    await get_record(training, job_id)  # 404 first
    try:
        record = await asyncio.to_thread(training.store.cancel, job_id)
    except JobConflict as e:
        raise ApiError(409, str(e), code="job_finished") from None
    if not record.final:
        response.status_code = 202  # the worker stops it within seconds
    return await public(training, record)


@router.post("/{job_id}/pause", response_model=TrainJobPublic)
async def pause_job(job_id: str, training: TrainingDep, response: Response) -> TrainJobPublic:
    """Pause a queued job at once, or ask a running one to save its state where it is and free its worker
    (202; within seconds). 409 for a job that has ended."""
    record = await change_state(training, job_id, "pause")
    if record.state != "paused":
        response.status_code = 202
    return await public(training, record)


@router.post("/{job_id}/resume", response_model=TrainJobPublic)
async def resume_job(job_id: str, training: TrainingDep) -> TrainJobPublic:
    """Queue a paused job again: the next free worker goes on from the step it stopped at. 409 for a job that is
    not paused (nor asked to pause)."""
    return await public(training, await change_state(training, job_id, "resume"))


async def change_state(training: Training, job_id: str, action: Literal["pause", "resume"]) -> JobRecord:
    """Pause or resume a job: 404 for an unknown one, 409 when its state does not allow it."""
    await get_record(training, job_id)
    change = training.store.pause if action == "pause" else training.store.resume
    try:
        return await asyncio.to_thread(change, job_id)
    except JobConflict as e:
        raise ApiError(409, str(e), code="job_finished" if action == "pause" else "job_not_paused") from None


# ---------------------------------------------------------------------------- events


@router.get("/{job_id}/events", response_class=Response, responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request, training: TrainingDep, settings: SettingsDep) -> sse.EventStream:
    """Server-Sent Events: queue position, progress, epochs, checkpoints, then one done/failed/cancelled."""
    await get_record(training, job_id)
    last_id = request.headers.get("last-event-id")
    return sse.EventStream(follow_job(training, job_id, last_id), keepalive_s=settings.keepalive_s)


async def follow_job(training: Training, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    """The job's events from `after` on; while queued, its queue position whenever it changes."""
    position: int | None = None
    try:
        while True:
            for event in await asyncio.to_thread(training.store.events, job_id, after):
                after = event.id
                yield _frame(event.kind, event.data, event.id)
                if event.kind in FINAL_EVENTS.values():
                    return
            record = await asyncio.to_thread(training.store.get, job_id)
            if record.state == "queued":
                now = await asyncio.to_thread(training.store.queue_position, job_id)
                if now != position:
                    position = now
                    yield _frame("queued", {"state": "queued", "position": now})
            elif record.final and not await asyncio.to_thread(training.store.events, job_id, after):
                yield _frame(FINAL_EVENTS[record.state], {"state": record.state, "error": record.error})
                return
            await asyncio.sleep(EVENT_POLL_S)
    except StoreUnavailable as e:  # Redis went away mid-stream: say so; the client reconnects with Last-Event-ID
        log.warning("job %s event stream ended: %s", job_id, e)
        error = {"type": "service_unavailable", "message": str(e), "retryable": True}
        yield _frame("error", {"error": error})


def _frame(kind: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return format_sse_event(event=kind, id=event_id, data_str=payload)
