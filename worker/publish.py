"""Publish a job's model exactly once, and promote it only if nobody promoted another meanwhile.

Exactly once: the model id is fixed when the job is submitted (`params["name"]`) and the
checkpoint's config.json names the job (`training.job_id`). Writing a checkpoint is an atomic
rename that refuses an existing folder, so whichever run of a job gets there first publishes,
and a second run (its first worker was killed after publishing) finds the model and adopts it.

Compare-and-set: the job remembers the active model id from when it first started; the
promotion succeeds only if the pointer still holds that id. An operator's rollback or another
job's promotion in between wins, and the new model stays published but inactive.

A promotion is `PUT /models/aliases/production {"model": id}`, as `POST /models/{id}/activate` is: it
clears production's canary. `activate: "canary:<weight>"` instead makes the model production's canary
at that weight, compare-and-set against the same remembered model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lm.aliases import PRODUCTION, AliasStore, Canary, canary_weight, set_alias
from lm.checkpoint import read_config
from lm.errors import CheckpointError, PromotionConflict, TextgenError
from lm.registry import Registry
from lm.train import TrainResult
from lm.train.evaluate import evaluate_ids
from worker.errors import JobFailed

log = logging.getLogger(__name__)


@dataclass
class Publication:
    model_id: str
    metrics: dict[str, Any]
    activated: bool
    note: str | None = None  # why it was not activated, or that it became production's canary


@dataclass
class Gate:
    """The quality gate's verdict before activation: "passed" (no worse than the active model), "held_back"
    (worse: published, not activated), or "skipped" (nothing to compare with: no active model, or one whose
    tokenizer differs, so that losses per token do not compare). Losses in nats per token."""

    result: str
    reason: str
    val_loss: float | None = None
    active_val_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "reason": self.reason,
            "val_loss": self.val_loss,
            "active_val_loss": self.active_val_loss,
        }


def quality_gate(registry: Registry, result: TrainResult, active_id: str | None) -> Gate:
    """Score the new model and the active one on the same held-out tokens (the ones training validated on,
    with their target mask: the assistant's tokens of chat data), when their tokenizers are the same."""
    if active_id is None:
        return Gate("skipped", "no model was active")
    try:
        active = registry.load(active_id)
    except TextgenError as e:
        return Gate("skipped", f"the active model {active_id!r} could not be loaded ({e})")
    if active.tokenizer.to_dict() != result.tokenizer.to_dict():
        return Gate(
            "skipped",
            f"the active model {active_id!r} has another tokenizer ({active.tokenizer.kind}, "
            f"{active.tokenizer.vocab_size} tokens, against {result.tokenizer.kind}, {result.tokenizer.vocab_size}): "
            "losses per token do not compare",
        )
    if result.val_data is None:
        return Gate("skipped", "training kept no held-out tokens")
    seq_len = result.config.seq_len
    new = evaluate_ids(result.model.eval(), result.val_data, seq_len, mask=result.val_targets)
    old = evaluate_ids(active.model.eval(), result.val_data, seq_len, mask=result.val_targets)
    if new <= old:
        reason = (
            f"validation loss {new:.4f} is no worse than the active model {active_id!r} ({old:.4f}) on the same text"
        )
        return Gate("passed", reason, new, old)
    reason = f"validation loss {new:.4f} is worse than the active model {active_id!r} ({old:.4f}) on the same text"
    return Gate("held_back", reason, new, old)


def published_by(registry: Registry, model_id: str, job_id: str) -> dict[str, Any] | None:
    """config.json of `model_id` when this job published it; None when there is no such model. It reads the
    models folder only (no pointer read), so a Redis outage does not stop a publication."""
    path = registry.path(model_id)
    if not path.is_dir():
        return None
    config = read_config(path)
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
            chat_template=result.chat_template,  # a fine-tune keeps its base model's
        )
    except CheckpointError:
        config = published_by(registry, model_id, training["job_id"])
        if config is None:
            raise
        log.info("model %s was already published by another run of job %s", model_id, training["job_id"])
    return read_config(registry.path(model_id))


def gated(activate: object) -> bool:
    """Whether a job's `activate` passes through the quality gate: true and "canary:<weight>" do, "always"
    (and false: nothing to gate) do not."""
    return activate is True or canary_weight(activate) is not None


def release(
    registry: Registry,
    aliases: AliasStore,
    model_id: str,
    activate: object,
    gate: dict[str, Any] | None,
    active_at_start: str | None,
) -> tuple[bool, str | None, dict[str, Any] | None]:
    """What a job's published model becomes, by its `activate`: production's model, its canary, or neither
    (false, or held back by the gate); (activated, note, the "canary" event's data when it became one)."""
    if not activate:
        return False, None, None
    weight = canary_weight(activate)
    if gated(activate) and gate is not None and gate["result"] == "held_back":
        what = "activated" if weight is None else "made production's canary"
        return False, f"published but not {what} by the quality gate: {gate['reason']}", None
    if weight is None or active_at_start is None:  # no production to be the canary of: the model becomes it
        activated, note = promote(registry, aliases, model_id, active_at_start)
        if weight is not None and activated:
            note = "no model was active, so there was no production to be the canary of: it is the active model"
        return activated, note, None
    return canary(registry, aliases, model_id, weight, active_at_start)


def promote(
    registry: Registry, aliases: AliasStore, model_id: str, active_at_start: str | None
) -> tuple[bool, str | None]:
    """Make `model_id` production's model, its canary cleared (= POST /models/{id}/activate), compare-and-set
    from `active_at_start`; (activated, note)."""
    registry.get(model_id)  # ModelNotFound / CheckpointError before the pointer moves
    try:
        set_alias(aliases, PRODUCTION, model_id, None, active_at_start)
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
    log.info("activated model %s", model_id)
    return True, None


def canary(
    registry: Registry, aliases: AliasStore, model_id: str, weight: float, active_at_start: str
) -> tuple[bool, str | None, dict[str, Any] | None]:
    """Make `model_id` production's canary at `weight`, while production's model is still `active_at_start`
    (a canary it already had is replaced); (activated, note, the "canary" event's data)."""
    registry.get(model_id)
    before = aliases.all().get(PRODUCTION)
    try:
        alias = set_alias(aliases, PRODUCTION, active_at_start, Canary(model_id, weight), active_at_start)
    except PromotionConflict:
        current = registry.active_id()
        if current == model_id:  # an earlier run made it the canary, and an operator promoted it since
            return True, None, None
        note = (
            f"published but not made production's canary: the active model changed to {current!r} while this job "
            f"ran (it was {active_at_start!r}); PUT /models/aliases/production with it as the canary to use it"
        )
        log.info("%s", note)
        return False, note, None
    share = f"{weight * 100:g}%"
    note = f"serving {share} of production's traffic as its canary; production's model stays {active_at_start!r}"
    if before is not None and before.canary is not None and before.canary.model != model_id:
        note += f" (it replaced the canary {before.canary.model!r})"
    note += "; POST /models/aliases/production/promote or /abort when it has been watched"
    log.info("model %s: %s", model_id, note)
    event = {"alias": PRODUCTION, "model": alias.model, "canary": {"model": model_id, "weight": weight}, "note": note}
    return False, note, event
