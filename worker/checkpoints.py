"""Per-epoch checkpoints: each epoch's model, published as a registry model of its own while the job trains.

At each epoch's end the training loop saves its resumable state (lm/train/state.py) and says so with a
`state_saved` event right after the epoch's `epoch` event. The checkpointer reads the model back from that
state and publishes it as `<model>-ckpt-step-<step>`, a model like any other: `/v1/chat/completions` and the
generation routes serve it by its id, and `POST /models/{id}/activate` makes it the active model. Only the
last `keep` are kept: an older one is deleted when a newer lands, unless it is active or an alias names it.

Publishing is exactly once, as for the job's final model (worker/publish.py): a checkpoint's config.json
names the job, and a resumed run that finds its checkpoint published already adopts it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from jobs.errors import StoreUnavailable
from jobs.records import utc_now
from jobs.store import JobStore
from lm.aliases import AliasStore
from lm.errors import ActiveModelError, CheckpointError, ModelNotFound
from lm.model import LSTMLanguageModel
from lm.registry import Registry
from lm.tokenizers import load_tokenizer
from lm.train import STATE_JSON, TrainConfig, TrainEvent
from lm.train.state import STATE_TENSORS, STATE_TOKENIZER
from worker.publish import published_by

log = logging.getLogger(__name__)

SUFFIX = "-ckpt-step-"


def checkpoint_id(model_id: str, step: int) -> str:
    """`<model>-ckpt-step-<step>`, the model id cut short where needed to keep within a model id's 64 characters."""
    tail = f"{SUFFIX}{step}"
    return f"{model_id[: 64 - len(tail)].rstrip('-._')}{tail}"


class Checkpointer:
    """lm.train's on_event, beside the Reporter: publishes each epoch's model, keeps the last `keep`."""

    def __init__(
        self,
        registry: Registry,
        aliases: AliasStore,
        store: JobStore,
        job_id: str,
        *,
        model_id: str,
        keep: int,
        state_dir: Path,
        training: dict[str, Any],
        chat_template: dict[str, Any] | None = None,
        kept: list[dict[str, Any]] | None = None,
    ) -> None:
        self.registry, self.aliases, self.store = registry, aliases, store
        self.job_id, self.model_id, self.keep, self.state_dir = job_id, model_id, keep, state_dir
        self.training, self.chat_template = training, chat_template
        self.checkpoints: list[dict[str, Any]] = list(kept or [])  # the job record's, from an earlier run
        self._epoch: TrainEvent | None = None  # the epoch whose state is about to be saved

    def __call__(self, event: TrainEvent) -> None:
        if self.keep <= 0:
            return
        if event.kind == "epoch":
            self._epoch = event
        elif event.kind == "state_saved" and self._epoch is not None and event.step == self._epoch.step:
            epoch, self._epoch = self._epoch, None
            self.publish(epoch)

    def publish(self, epoch: TrainEvent) -> None:
        """Publish the saved state's model as this epoch's checkpoint, record it, and prune the oldest."""
        model_id = checkpoint_id(self.model_id, epoch.step)
        if any(c["model_id"] == model_id for c in self.checkpoints):
            return  # a resumed run saving the same epoch again
        metrics = {"step": epoch.step, "epoch": epoch.epoch, "train_loss": epoch.train_loss, "val_loss": epoch.val_loss}
        if published_by(self.registry, model_id, self.job_id) is None:
            model, tokenizer = self._saved_model()
            training = {**self.training, "checkpoint_of": self.model_id, "epoch": epoch.epoch, "step": epoch.step}
            try:
                self.registry.publish(
                    model,
                    tokenizer,
                    model_id=model_id,
                    training=training,
                    metrics=metrics,
                    activate=False,
                    chat_template=self.chat_template,
                )
            except CheckpointError:
                if published_by(self.registry, model_id, self.job_id) is None:
                    raise
        self.checkpoints.append({"model_id": model_id, **metrics, "created": utc_now()})
        self._prune()
        self._record("model_checkpoint", {"model_id": model_id, **metrics})
        log.info("job %s: checkpoint %s published (epoch %d, step %d)", self.job_id, model_id, epoch.epoch, epoch.step)

    def _saved_model(self) -> tuple[LSTMLanguageModel, Any]:
        """The model of the state just saved, on the CPU, with its tokenizer."""
        meta = json.loads((self.state_dir / STATE_JSON).read_text(encoding="utf-8"))
        cfg = TrainConfig.from_dict(meta["config"])
        tokenizer = load_tokenizer(self.state_dir / STATE_TOKENIZER)
        model = LSTMLanguageModel(cfg.model_config(tokenizer.vocab_size))
        tensors = load_file(str(self.state_dir / STATE_TENSORS))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        return model.eval(), tokenizer

    def _prune(self) -> None:
        """Delete the checkpoints past the last `keep`, but never one that is active or that an alias names.
        While Redis is unreachable nothing is deleted (what is in use cannot be known); the next epoch prunes."""
        if len(self.checkpoints) <= self.keep:
            return
        try:
            named = {target for alias in self.aliases.all().values() for target in alias.targets()}
            named.add(self.registry.active_id() or "")
        except StoreUnavailable as e:
            log.warning("job %s: old checkpoints kept for now: %s", self.job_id, e)
            return
        while len(self.checkpoints) > self.keep:
            oldest = self.checkpoints[0]["model_id"]
            if oldest in named:
                log.info("job %s: checkpoint %s is kept: it is in use", self.job_id, oldest)
            else:
                try:
                    self.registry.delete(oldest)
                except ModelNotFound:
                    pass  # deleted by hand
                except ActiveModelError:
                    log.info("job %s: checkpoint %s is kept: it became active", self.job_id, oldest)
            self.checkpoints.pop(0)

    def _record(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self.store.update(self.job_id, checkpoints=self.checkpoints)
            self.store.append_event(self.job_id, kind, data)
        except StoreUnavailable as e:
            log.warning("job %s: checkpoint %s not recorded: %s", self.job_id, data.get("model_id"), e)
