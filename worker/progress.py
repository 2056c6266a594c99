"""What a running job tells the world (progress events) and what it listens to (stop requests).

Both talk to the job store. A store that is briefly unreachable (Redis restarting) must not
fail a training run: a lost progress event is logged and dropped, and a stop check that cannot
reach the store answers "keep going".
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any

from jobs.errors import StoreUnavailable
from jobs.records import JobRecord
from jobs.store import JobStore
from lm.train import TrainEvent

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("epoch", "epochs", "step", "total_steps", "train_loss", "tokens_per_s", "eta_s", "lr")


def elapsed_before(record: JobRecord) -> float:
    """The job's training time over its earlier attempts: the total its last progress reported."""
    return float((record.progress or {}).get("elapsed_s") or 0.0)


class Reporter:
    """lm.train's on_event: progress, each epoch's validation loss and sample, each saved training state.

    Progress carries two times: `attempt_elapsed_s`, this attempt's training time, and `elapsed_s`, the
    job's over every attempt (`elapsed_before_s` plus this attempt's). lm's own elapsed_s would mix
    them: after a takeover it is the saved state's time plus this attempt's, and the work lost with
    the first worker is in neither.
    """

    def __init__(self, store: JobStore, job_id: str, elapsed_before_s: float = 0.0) -> None:
        self.store = store
        self.job_id = job_id
        self.elapsed_before_s = elapsed_before_s
        self.history: list[dict[str, Any]] = []

    def __call__(self, event: TrainEvent) -> None:
        try:
            self._report(event)
        except StoreUnavailable as e:
            log.warning("job %s: %s event not recorded: %s", self.job_id, event.kind, e)

    def _report(self, event: TrainEvent) -> None:
        progress = {key: getattr(event, key) for key in PROGRESS_KEYS}
        progress["elapsed_s"] = self.elapsed_before_s + event.session_elapsed_s
        progress["attempt_elapsed_s"] = event.session_elapsed_s
        if event.kind == "progress":
            self.store.update(self.job_id, progress=progress)
            self.store.append_event(self.job_id, "progress", progress)
        elif event.kind == "epoch":
            entry = {"epoch": event.epoch, "train_loss": event.train_loss, "val_loss": event.val_loss}
            self.history.append(entry)
            self.store.update(self.job_id, progress=progress, metrics={**entry, "history": self.history})
            self.store.append_event(
                self.job_id, "epoch", {**progress, "val_loss": event.val_loss, "sample": event.sample}
            )
            log.info("job %s: epoch %d/%d val loss %.4f", self.job_id, event.epoch, event.epochs, event.val_loss)
        elif event.kind == "state_saved":
            # where a takeover or a resume goes on (its requeued or paused event)
            self.store.update(self.job_id, saved_epoch=event.epoch, saved_step=event.step)
            self.store.append_event(self.job_id, "checkpoint", {"epoch": event.epoch, "step": event.step})


class Stopper:
    """lm.train's should_stop: True on SIGTERM, when the worker that started us is gone, or when the job is
    asked to cancel or to pause. The training loop then saves its state where it is (mid-epoch too), so a
    paused or handed-back job resumes at the step it stopped at. The store is asked about a cancel or a
    pause at most every `poll_s` seconds (should_stop runs every step).
    """

    def __init__(self, store: JobStore, job_id: str, parent_pid: int, *, poll_s: float = 1.0) -> None:
        self.store = store
        self.job_id = job_id
        self.parent_pid = parent_pid
        self.poll_s = poll_s
        self.shutting_down = False
        self.parent_gone = False
        self.request: str | None = None  # "cancel" | "pause", as the store last said
        self._next_poll = 0.0

    @property
    def cancelled(self) -> bool:
        return self.request == "cancel"

    @property
    def pausing(self) -> bool:
        return self.request == "pause"

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which sends us SIGTERM

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.shutting_down = True

    def __call__(self) -> bool:
        if self.shutting_down:
            return True
        if os.getppid() != self.parent_pid:
            self.parent_gone = True
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            try:
                self.request = self.store.stop_requested(self.job_id)
            except StoreUnavailable as e:
                log.warning("job %s: cannot check for a cancel or a pause: %s", self.job_id, e)
        return self.request is not None
