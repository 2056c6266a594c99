"""Publish a job's model exactly once, and promote it only if nobody promoted another meanwhile.

Exactly once: the model id is fixed when the job is submitted (`params["name"]`) and the
checkpoint's config.json names the job (`training.job_id`). Writing a checkpoint is an atomic
rename that refuses an existing folder, so whichever run of a job gets there first publishes,
and a second run (its first worker was killed after publishing) finds the model and adopts it.

Compare-and-set: the job remembers the active model id from when it first started; the
promotion succeeds only if the pointer still holds that id. An operator's rollback or another
job's promotion in between wins, and the new model stays published but inactive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lm.checkpoint import read_config
from lm.errors import CheckpointError, ModelNotFound, PromotionConflict
from lm.registry import Registry
from lm.train import TrainResult
from worker.errors import JobFailed

log = logging.getLogger(__name__)


@dataclass
class Publication:
    model_id: str
    metrics: dict[str, Any]
    activated: bool
    note: str | None = None  # why it was not activated


def published_by(registry: Registry, model_id: str, job_id: str) -> dict[str, Any] | None:
    """config.json of `model_id` when this job published it; None when there is no such model."""
    try:
        config = registry.get(model_id).config
    except ModelNotFound:
        return None
    if config.get("training", {}).get("job_id") != job_id:
        raise JobFailed(f"a model named {model_id!r} already exists; submit the job again with another name")
    return config


def save_model(registry: Registry, result: TrainResult, *, model_id: str, training: dict[str, Any]) -> dict[str, Any]:
    """Write the checkpoint; a concurrent run of the same job that got there first is fine."""
    try:
        registry.publish(
            result.model,
            result.tokenizer,
            model_id=model_id,
            training=training,
            metrics=result.metrics,
            activate=False,
        )
    except CheckpointError:
        config = published_by(registry, model_id, training["job_id"])
        if config is None:
            raise
        log.info("model %s was already published by another run of job %s", model_id, training["job_id"])
    return read_config(registry.path(model_id))


def promote(registry: Registry, model_id: str, active_at_start: str | None) -> tuple[bool, str | None]:
    """Compare-and-set the active pointer from `active_at_start` to `model_id`; (activated, note)."""
    try:
        registry.activate(model_id, expected=active_at_start)
    except PromotionConflict:
        current = registry.active_id()
        if current == model_id:  # an earlier run of this job promoted it already
            return True, None
        note = (
            f"published but not activated: the active model changed to {current!r} while this job ran "
            f"(it was {active_at_start!r}); POST /models/{model_id}/activate to use it"
        )
        log.info("%s", note)
        return False, note
    return True, None
