"""OpenAI's fine-tuning jobs, on textgen's own job system. Admin key when keys are configured.

A fine-tuning job IS a training job: the same record, worker, states, events, resume and hot swap as
POST /train, under the same id; GET /train lists the jobs created here, and GET /v1/fine_tuning/jobs
lists those of POST /train. The create body maps onto POST /train's (docs/TRAINING.md, "OpenAI's
fine-tuning fields"): `model` is the base model (or a recipe, `textgen-char`, `textgen-word`,
`textgen-bpe`, that trains from scratch), the training file's text is the corpus, `hyperparameters`
are `epochs`, `batch_size` and `lr`, and every `textgen train` field may stand beside them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.auth import require_admin_key
from app.deps import SettingsDep
from app.errors import ApiError, error_responses
from app.fine_tuning_schemas import (
    RECIPES,
    CheckpointMetrics,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    Hyperparameters,
    JobError,
    JobHyperparameters,
)
from app.routes.files import page_after
from app.routes.train import change_state, get_record, plan_job, store_job
from app.settings import Settings
from app.train_schemas import HYPER, TrainJobCreate
from app.training import Training, TrainingDep
from jobs.errors import JobConflict
from jobs.records import JobEvent, JobRecord, new_job_id, unix_time
from jobs.uploads import UploadNotFound, Uploads
from lm.checkpoint import validate_model_id
from lm.errors import InvalidModelId, ModelNotFound
from lm.train import BOUNDS, TrainConfig

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["fine-tuning"],
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 500, 503, 507),
)

ORGANIZATION = "textgen"
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
MAX_LISTED = 100_000  # jobs a listing looks through
SUFFIX_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
DEFAULT_LR = TrainConfig().lr
IDEMPOTENCY_WAIT_S = 10.0  # how long a retry waits for the first request's job to be stored


# ---------------------------------------------------------------------------- create


@router.post("", response_model=FineTuningJob)
async def create_job(
    body: FineTuningJobCreate,
    training: TrainingDep,
    settings: SettingsDep,
    idempotency_key: str | None = Header(
        None, max_length=256, description="a retry with the same key gets the same job"
    ),
) -> FineTuningJob:
    """Queue a fine-tuning job on an uploaded file; a retry with the same `Idempotency-Key` gets the first job."""
    text, validation = await asyncio.to_thread(_read_files, body, Uploads(settings.models_dir), settings)
    job_id = new_job_id()
    params = await asyncio.to_thread(_plan, body, text, validation, job_id, training, settings)
    if idempotency_key is not None:
        bound = await asyncio.to_thread(training.store.remember_request, idempotency_key, job_id)
        if bound != job_id:
            log.info("fine-tuning job %s: a retry (same Idempotency-Key)", bound)
            return await _first_job(training, bound)
    try:
        record = await asyncio.to_thread(store_job, training, params, text, job_id, settings, validation)
    except Exception:
        if idempotency_key is not None:
            await asyncio.to_thread(training.store.forget_request, idempotency_key, job_id)
        raise
    training.ensure_local_worker()
    log.info("queued fine-tuning job %s: %s -> %s", job_id, body.model, params["name"])
    return job_object(record)


def _read_files(body: FineTuningJobCreate, uploads: Uploads, settings: Settings) -> tuple[str, str | None]:
    """The training file's text (and the validation file's): 400 for a file that is not there."""
    texts: list[str | None] = []
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id is None:
            texts.append(None)
            continue
        try:
            meta, data = uploads.get(file_id), uploads.content(file_id)
        except UploadNotFound:
            raise ApiError(400, f"no uploaded file {file_id!r}", param=param, code="file_not_found") from None
        if meta.get("purpose") != "fine-tune":
            raise ApiError(400, f"file {file_id} was not uploaded for purpose fine-tune", param=param)
        if len(data) > settings.max_corpus_bytes:
            limit = settings.max_corpus_bytes
            message = f"file {file_id} has {len(data):,} bytes; TEXTGEN_MAX_CORPUS_BYTES allows {limit:,} to train on"
            raise ApiError(400, message, param=param, code="corpus_too_large")
        texts.append(data.decode("utf-8").removeprefix("\ufeff"))  # validated at upload
    assert texts[0] is not None
    return texts[0], texts[1]


def _plan(
    body: FineTuningJobCreate, text: str, validation: str | None, job_id: str, training: Training, settings: Settings
) -> dict[str, Any]:
    """The job's params, as POST /train plans them, plus what OpenAI's fields were (runs in a thread)."""
    hyper = _hyperparameters(body)
    base_model, tokenizer = _model(body.model, hyper, training)
    fields: dict[str, Any] = {**hyper, "text": text, "validation_text": validation, "activate": body.activate}
    fields["keep_checkpoints"] = body.keep_checkpoints
    if tokenizer is not None:
        fields["tokenizer"] = tokenizer
    fields["base_model"] = base_model
    fields["name"] = body.name or _model_name(body.model, body.suffix, job_id)
    try:
        train_body = TrainJobCreate.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    try:
        params = plan_job(train_body, text, body.training_file, job_id, training, settings)
    except ApiError as e:  # POST /train's 422s name its fields; here they are a 400 naming ours
        if e.status != 422:
            raise
        ours = {"base_model": "model", "text": "training_file", "validation_text": "validation_file", "name": "suffix"}
        param = ours.get(e.param or "", e.param)
        raise ApiError(400, e.message, param=param, code=e.code) from None
    params["fine_tuning"] = {
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "suffix": body.suffix,
        "metadata": body.metadata,
    }
    return params


def _hyperparameters(body: FineTuningJobCreate) -> dict[str, Any]:
    """The `textgen train` fields the body sets: its own, and OpenAI's hyperparameters mapped onto them."""
    given = body.given()
    if body.integrations:
        raise ApiError(400, "textgen has no integrations; send null or []", param="integrations")
    hp = body.hyperparameters
    if body.method is not None:
        if body.method.type != "supervised":
            raise ApiError(400, f"textgen trains the supervised method only, not {body.method.type!r}", param="method")
        nested = body.method.supervised.hyperparameters if body.method.supervised else None
        if nested is not None and hp is not None:
            raise ApiError(400, "give the hyperparameters once: in `method` or at the top", param="hyperparameters")
        hp = nested or hp
    for field, value in _mapped(hp or Hyperparameters()).items():
        if field in given:
            openai_name = {"epochs": "n_epochs", "lr": "learning_rate_multiplier"}.get(field, field)
            raise ApiError(400, f"give {field} once: as `{field}` or as hyperparameters.{openai_name}", param=field)
        given[field] = value
    return given


def _mapped(hp: Hyperparameters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(hp.n_epochs, int):
        out["epochs"] = _within("epochs", hp.n_epochs, "hyperparameters.n_epochs")
    if isinstance(hp.batch_size, int):
        out["batch_size"] = _within("batch_size", hp.batch_size, "hyperparameters.batch_size")
    if isinstance(hp.learning_rate_multiplier, float | int):
        lr = DEFAULT_LR * hp.learning_rate_multiplier
        out["lr"] = _within("lr", lr, "hyperparameters.learning_rate_multiplier")
    return out


def _within(field: str, value: Any, param: str) -> Any:
    lo, hi = BOUNDS[field]
    if not lo <= value <= hi:
        raise ApiError(400, f"{param}: gives {field}={value:g}, outside {lo:g}..{hi:g}", param=param)
    return value


def _model(model: str, hyper: dict[str, Any], training: Training) -> tuple[str | None, str | None]:
    """(the base model, the tokenizer): a registry model keeps its own; a recipe trains from scratch."""
    if model in RECIPES:
        tokenizer = RECIPES[model]
        if hyper.get("tokenizer", tokenizer) != tokenizer:
            raise ApiError(400, f"{model} trains a {tokenizer} tokenizer, not {hyper['tokenizer']}", param="tokenizer")
        return None, tokenizer
    try:
        training.registry.get(model)
    except (ModelNotFound, InvalidModelId):
        names = [info.model_id for info in training.registry.list()] + list(RECIPES)
        raise ApiError(
            400, f"no model {model!r} to fine-tune; choose one of: {', '.join(names)}", param="model"
        ) from None
    if "tokenizer" in hyper:
        raise ApiError(400, f"{model} keeps its own tokenizer; leave `tokenizer` out", param="tokenizer")
    return model, None


def _model_name(model: str, suffix: str | None, job_id: str) -> str:
    """<model>-ft[-<suffix>]-<the job id's 6 hex>, the model part shortened to fit 64 characters."""
    if suffix is not None and not SUFFIX_RE.fullmatch(suffix):
        raise ApiError(400, "suffix: 1-40 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", param="suffix")
    tail = f"-ft{'-' + suffix if suffix else ''}-{job_id[-6:]}"
    name = f"{model[: 64 - len(tail)]}{tail}"
    try:
        return validate_model_id(name)
    except InvalidModelId as e:
        raise ApiError(400, str(e), param="suffix") from None


async def _first_job(training: Training, job_id: str) -> FineTuningJob:
    """The job a retry's key is bound to, once the first request has stored it."""
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        try:
            return job_object(await get_record(training, job_id))
        except ApiError:
            if time.monotonic() > deadline:
                message = "a request with this Idempotency-Key is still creating its job; retry shortly"
                raise ApiError(409, message, code="idempotency_key_in_use") from None
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------- the objects


def job_object(record: JobRecord) -> FineTuningJob:
    """A textgen job as OpenAI's `fine_tuning.job`, whichever route created it."""
    params = record.params
    ft = params.get("fine_tuning") or {}
    cfg = TrainConfig.from_dict({k: v for k, v in params.items() if k in HYPER})
    hyper = JobHyperparameters(
        # no epoch cap: a time budget ends the run ("auto")
        n_epochs=cfg.epoch_cap() or "auto",
        batch_size=cfg.batch_size,
        learning_rate_multiplier=cfg.lr / DEFAULT_LR,
    )
    metrics = record.metrics or {}
    progress = record.progress or {}
    eta = progress.get("eta_s")
    error = (
        JobError(code="training_failed", message=record.error) if record.state == "failed" and record.error else None
    )
    return FineTuningJob(
        id=record.id,
        created_at=_seconds(record.created) or 0,
        finished_at=_seconds(record.finished),
        model=ft.get("model") or params.get("base_model") or f"textgen-{cfg.tokenizer}",
        fine_tuned_model=record.model_id if record.state == "succeeded" else None,
        organization_id=ORGANIZATION,
        result_files=[],
        status=record.state,  # type: ignore[arg-type]  # textgen's states are OpenAI's, less validating_files
        trained_tokens=metrics.get("tokens") if record.state == "succeeded" else None,
        training_file=ft.get("training_file") or params.get("corpus_name") or "",
        validation_file=ft.get("validation_file"),
        hyperparameters=hyper,
        seed=cfg.seed,
        error=error,
        estimated_finish=int(time.time() + eta) if record.state == "running" and eta is not None else None,
        integrations=[],
        metadata=ft.get("metadata"),
        method={"type": "supervised", "supervised": {"hyperparameters": hyper.model_dump()}},
        user_provided_suffix=ft.get("suffix"),
        activated=record.activated,
        gate=record.gate,
        note=record.note,
    )


def _seconds(iso: str | None) -> int | None:
    at = unix_time(iso)
    return None if at is None else int(at)


def event_object(job_id: str, event: JobEvent) -> FineTuningJobEvent:
    """A job's event as OpenAI's `fine_tuning.job.event`: progress and epochs are `metrics`, the rest messages."""
    data, kind = event.data, event.kind
    level, kind_type = "info", "message"
    if kind == "progress":
        kind_type = "metrics"
        message = f"Step {data.get('step')}/{data.get('total_steps')}: training loss={_num(data.get('train_loss'))}"
    elif kind == "epoch":
        kind_type = "metrics"
        message = f"Epoch {data.get('epoch')}/{data.get('epochs')}: validation loss={_num(data.get('val_loss'))}"
    elif kind == "queued":
        message = "Job queued"
    elif kind == "started":
        message = f"Job started on worker {data.get('worker')} (attempt {data.get('attempt')})"
    elif kind == "checkpoint":
        message = f"Saved the training state at step {data.get('step')} ({data.get('epoch')} epochs done)"
    elif kind == "model_checkpoint":
        kind_type = "metrics"
        message = (
            f"Checkpoint created at step {data.get('step')} (epoch {data.get('epoch')}): {data.get('model_id')}, "
            f"validation loss={_num(data.get('val_loss'))}"
        )
    elif kind == "paused":
        message = f"Job paused at step {data.get('saved_step')}; its training state is saved"
    elif kind == "resumed":
        message = f"Job resumed: it goes on from step {data.get('saved_step')}"
    elif kind == "requeued":
        level, message = "warn", f"Job requeued: {data.get('reason')}"
    elif kind == "gate":
        level = "warn" if data.get("result") == "held_back" else "info"
        message = f"Quality gate {str(data.get('result')).replace('_', ' ')}: {data.get('reason')}"
    elif kind == "published":
        message = f"New fine-tuned model created: {data.get('model_id')}"
    elif kind == "canary":
        message = f"{(data.get('canary') or {}).get('model')} became production's canary: {data.get('note')}"
    elif kind == "done":
        message = "The job has successfully completed"
    elif kind == "failed":
        level, message = "error", f"The job failed: {data.get('error')}"
    elif kind == "cancelled":
        message = "The job was cancelled"
    else:
        message = kind
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{event.id}",
        created_at=int(event.at or 0),
        level=level,  # type: ignore[arg-type]
        message=message,
        type=kind_type,  # type: ignore[arg-type]
        data={"kind": kind, **data},
    )


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float | int) else "n/a"


def checkpoint_objects(record: JobRecord) -> list[FineTuningJobCheckpoint]:
    """The job's per-epoch checkpoints still kept, oldest first; a job that kept none (`keep_checkpoints` 0)
    shows its published model as its one checkpoint once it has succeeded."""
    kept = [
        (c["model_id"], int(c.get("step") or 0), c.get("train_loss"), c.get("val_loss"), c.get("created"))
        for c in record.checkpoints or []
    ]
    if not kept and record.state == "succeeded" and record.model_id:
        metrics = record.metrics or {}
        kept = [
            (
                record.model_id,
                int(metrics.get("steps") or 0),
                metrics.get("train_loss"),
                metrics.get("val_loss"),
                record.finished,
            )
        ]
    return [
        FineTuningJobCheckpoint(
            id=f"{CHECKPOINT_PREFIX}{record.id}-{step:09d}",  # zero-padded: ids sort as the steps do
            created_at=_seconds(created) or 0,
            fine_tuned_model_checkpoint=model_id,
            fine_tuning_job_id=record.id,
            metrics=CheckpointMetrics(step=step, train_loss=train_loss, valid_loss=val_loss, full_valid_loss=val_loss),
            step_number=step,
        )
        for model_id, step, train_loss, val_loss, created in kept
    ]


# ---------------------------------------------------------------------------- read, cancel, pause


@router.get("", response_model=FineTuningJobList)
async def list_jobs(
    training: TrainingDep,
    after: str | None = Query(None, description="the id of the last job of the previous page"),
    limit: int = Query(20, ge=1, le=1000),
) -> FineTuningJobList:
    """Every training job (those of POST /train too), newest first, paged with `after`."""
    records = await asyncio.to_thread(training.store.list_jobs, None, MAX_LISTED)
    page, has_more = page_after([{"id": r.id, "record": r} for r in records], after, limit, descending=True)
    return FineTuningJobList(data=[job_object(item["record"]) for item in page], has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob)
async def get_job(job_id: str, training: TrainingDep) -> FineTuningJob:
    """One job: status, hyperparameters, the fine-tuned model once succeeded, or its error."""
    return job_object(await get_record(training, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
async def cancel_job(job_id: str, training: TrainingDep) -> FineTuningJob:
    """Cancel a queued job at once, or ask a running one to stop (within seconds; it publishes nothing)."""
    await get_record(training, job_id)  # 404 first
    try:
        record = await asyncio.to_thread(training.store.cancel, job_id)
    except JobConflict as e:
        raise ApiError(409, str(e), code="job_finished") from None
    return job_object(record)


@router.post("/{job_id}/pause", response_model=FineTuningJob)
async def pause_job(job_id: str, training: TrainingDep) -> FineTuningJob:
    """Pause a queued job at once, or ask a running one to save its state where it is and free its worker
    (its status turns `paused` within seconds). 409 for a job that has ended."""
    return job_object(await change_state(training, job_id, "pause"))


@router.post("/{job_id}/resume", response_model=FineTuningJob)
async def resume_job(job_id: str, training: TrainingDep) -> FineTuningJob:
    """Queue a paused job again: the next free worker goes on from the step it stopped at. 409 for a job that is
    not paused."""
    return job_object(await change_state(training, job_id, "resume"))


@router.get("/{job_id}/events", response_model=FineTuningJobEventList)
async def list_events(
    job_id: str,
    training: TrainingDep,
    after: str | None = Query(None, description="the id of the last event of the previous page"),
    limit: int = Query(20, ge=1, le=1000),
) -> FineTuningJobEventList:
    """The job's events, newest first, paged with `after`: progress and epochs as `metrics`, the rest as messages."""
    await get_record(training, job_id)
    events = await asyncio.to_thread(_all_events, training, job_id)
    events.reverse()
    start = 0
    if after is not None:
        ids = [f"{EVENT_PREFIX}{e.id}" for e in events]
        start = ids.index(after) + 1 if after in ids else len(ids)
    page = events[start : start + limit]
    return FineTuningJobEventList(data=[event_object(job_id, e) for e in page], has_more=start + limit < len(events))


def _all_events(training: Training, job_id: str) -> list[JobEvent]:
    """Every event the store keeps for the job, oldest first."""
    found: list[JobEvent] = []
    while batch := training.store.events(job_id, found[-1].id if found else None):
        found += batch
    return found


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
async def list_checkpoints(
    job_id: str,
    training: TrainingDep,
    after: str | None = Query(None, description="the id of the last checkpoint of the previous page"),
    limit: int = Query(10, ge=1, le=1000),
) -> FineTuningJobCheckpointList:
    """The job's checkpoints, newest first: each epoch's model, a registry model of its own (the last
    `keep_checkpoints` are kept), or its published model when it kept none."""
    record = await get_record(training, job_id)
    items = [{"id": c.id, "checkpoint": c} for c in reversed(checkpoint_objects(record))]
    page, has_more = page_after(items, after, limit, descending=True)
    data = [item["checkpoint"] for item in page]
    return FineTuningJobCheckpointList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
