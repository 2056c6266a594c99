"""Bodies and objects of OpenAI's Files and fine-tuning routes (/v1/files, /v1/fine_tuning/jobs), in the
shapes the official `openai` SDK parses. A fine-tuning job is a textgen training job: the create body
takes OpenAI's fields and, flat beside them, every `textgen train` field (the SDK's `extra_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.bodies import RequestBody
from app.train_schemas import Activate, TrainHyperparameters
from lm.train import BOUNDS

RECIPES = {"textgen-char": "char", "textgen-word": "word", "textgen-bpe": "bpe"}
FineTuningStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
EPOCHS, BATCH = BOUNDS["epochs"], BOUNDS["batch_size"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    format: str | None = Field(None, description="textgen: the training data's format (text, chat, completion)")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Hyperparameters(RequestBody):
    """OpenAI's hyperparameters; "auto" (or omitted) keeps the recipe's value."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] | None = Field(
        default=None, description=f"textgen's `epochs` ({EPOCHS[0]:g}..{EPOCHS[1]:g})"
    )
    batch_size: int | Literal["auto"] | None = Field(
        default=None, description=f"textgen's `batch_size`: parallel streams per step ({BATCH[0]:g}..{BATCH[1]:g})"
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        default=None, description="times the recipe's learning rate (textgen's `lr`)"
    )


class SupervisedMethod(RequestBody):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(RequestBody):
    """Only `supervised` is trained; `dpo` and `reinforcement` are refused."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobCreate(TrainHyperparameters):
    """POST /v1/fine_tuning/jobs: OpenAI's fields, and every `textgen train` field beside them."""

    model: str = Field(description="a registry model to fine-tune, or a recipe: " + ", ".join(RECIPES))
    training_file: str = Field(description="the id of an uploaded file (purpose fine-tune)")
    validation_file: str | None = Field(None, description="the id of an uploaded file of held-out examples")
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=40, description="goes into the new model's id")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="kept with the job")
    integrations: list[dict[str, Any]] | None = Field(None, description="none are supported: null or []")
    name: str | None = Field(None, description="textgen: the new model's id (default: <model>-ft[-<suffix>]-<6 hex>)")
    keep_checkpoints: int | None = Field(
        None,
        ge=0,
        le=100,
        description="textgen: each epoch's model is a checkpoint; keep the last this many (default: "
        "TEXTGEN_KEEP_CHECKPOINTS, 3); 0: none",
    )
    activate: Activate = Field(
        False,
        description="textgen: make the new model the active one when it is published, if it passes the quality "
        'gate (POST /train\'s `activate`); "always": without the gate; "canary:<weight>": production\'s canary '
        "at that weight instead",
    )


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int | Literal["auto"]
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]


class FineTuningJob(BaseModel):
    id: str = Field(description="the textgen job id: the same job as GET /train/{id}")
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None = Field(description="the published model's id, once succeeded")
    organization_id: str
    result_files: list[str]
    status: FineTuningStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    seed: int
    error: JobError | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    activated: bool | None = Field(None, description="textgen: whether the new model became the active one")
    note: str | None = Field(None, description="textgen: e.g. why a published model was not activated")
    gate: dict[str, Any] | None = Field(None, description="textgen: the quality gate's verdict before activation")


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
