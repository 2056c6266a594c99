"""The job function: train one job in this process, publish its model, record the outcome.

A worker runs each job in a child process of its own (`python -m worker.job '<json spec>'`),
so the torch threads can be capped and niced away from the API serving on the same machine,
and a crash or out-of-memory kill takes down the job and not the worker. The spec is JSON:

    {"claim": {"job_id", "token", "worker"}, "store": <JobStore.spec()>, "parent_pid": 123,
     "threads": 2, "nice": 10}

The exit status tells the worker what is left to do (worker/errors.py): 0 the outcome is
recorded; 75 stopped by SIGTERM, hand the job back; 76 the worker is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from jobs.files import corpus_path, remove_job_files, state_path, validation_path
from jobs.records import Claim, JobRecord
from jobs.retry import until_available
from jobs.store import JobStore, backend_from_spec
from lm.aliases import AliasStore
from lm.data import decode_corpus
from lm.errors import TrainingCancelled
from lm.registry import ActivePointer, Registry
from lm.train import TrainConfig, TrainEvent, train
from worker.checkpoints import Checkpointer
from worker.errors import EXIT_FINISHED, EXIT_HANDED_BACK, EXIT_PARENT_GONE, JobFailed, describe_failure
from worker.progress import Reporter, Stopper, elapsed_before
from worker.publish import Publication, gated, published_by, quality_gate, release, save_model

log = logging.getLogger(__name__)

T = TypeVar("T")
PR_SET_PDEATHSIG = 1


def run_job(spec: dict[str, Any]) -> int:
    """Run the job of `spec["claim"]` to its end (or until stopped); returns the exit status."""
    claim = Claim(**spec["claim"])
    backend = backend_from_spec(spec["store"])
    store = backend.store
    _limit_resources(spec.get("threads"), spec.get("nice", 0))
    stopper = Stopper(store, claim.job_id, spec["parent_pid"])
    stopper.install()
    if os.getppid() != spec["parent_pid"]:
        return EXIT_PARENT_GONE
    record = _retry(lambda: store.get(claim.job_id), stopper)
    log.info("job %s: training (attempt %d) on worker %s", claim.job_id, record.attempts, claim.worker)
    try:
        publication = train_and_publish(
            record, store, backend.pointer, stopper, aliases=backend.aliases, native=spec.get("native", True)
        )
    except TrainingCancelled:
        if stopper.shutting_down:
            return EXIT_HANDED_BACK
        if stopper.parent_gone:
            return EXIT_PARENT_GONE
        if stopper.pausing:
            _pause(store, claim, stopper)
            return EXIT_FINISHED
        _end(store, claim, stopper, "cancelled")
        return EXIT_FINISHED
    except Exception as exc:
        log.error("job %s failed", claim.job_id, exc_info=not isinstance(exc, JobFailed))
        _end(store, claim, stopper, "failed", error=describe_failure(exc))
        return EXIT_FINISHED
    values = {"model_id": publication.model_id, "metrics": publication.metrics, "activated": publication.activated}
    _end(store, claim, stopper, "succeeded", note=publication.note, **values)
    return EXIT_FINISHED


def train_and_publish(
    record: JobRecord,
    store: JobStore,
    pointer: ActivePointer,
    stopper: Stopper,
    *,
    aliases: AliasStore,
    native: bool = True,
) -> Publication:
    params, job_id = record.params, record.id
    models_dir = store.models_dir
    registry = Registry(models_dir, pointer)
    model_id = params["name"]
    activate = params.get("activate", True)  # True: if the quality gate passes; "always"; "canary:<w>"; False
    # "" = no model was active; recorded once, at the first start, and kept across resumes
    active_at_start = store.set_once(job_id, "active_at_start", pointer.get() or "")
    config = published_by(registry, model_id, job_id)
    gate = record.gate  # the quality gate's verdict: recorded by an earlier run that published, or below
    if config is None:
        text = decode_corpus(corpus_path(models_dir, job_id).read_bytes(), "the corpus")
        val_file = validation_path(models_dir, job_id)
        val_text = decode_corpus(val_file.read_bytes(), "the validation text") if val_file.is_file() else None
        cfg = _train_config(params, torch.get_num_threads())
        base = registry.load(params["base_model"]) if params.get("base_model") else None
        reporter = Reporter(store, job_id, elapsed_before_s=elapsed_before(record))
        state_dir = state_path(models_dir, job_id)
        checkpointer = Checkpointer(
            registry,
            aliases,
            store,
            job_id,
            model_id=model_id,
            keep=int(params.get("keep_checkpoints") or 0),
            state_dir=state_dir,
            training={"command": "POST /train", "job_id": job_id, "corpus_name": params.get("corpus_name")},
            chat_template=base.config.get("chat_template") if base is not None else None,
            kept=record.checkpoints,
        )

        def on_event(event: TrainEvent) -> None:
            reporter(event)
            checkpointer(event)

        result = train(
            text,
            cfg,
            on_event=on_event,
            should_stop=stopper,
            state_dir=state_dir,
            base=base,
            native=native,
            val_text=val_text,
        )
        if stopper.cancelled:  # cancelled during the last validation: publish nothing
            raise TrainingCancelled("training was cancelled")
        training = {
            "recipe": result.config.to_dict(),
            "corpus_name": params.get("corpus_name"),
            "corpus_sha256": result.corpus_sha256,
            "corpus_bytes": result.corpus_bytes,
            "seed": result.config.seed,
            "parent_model": params.get("base_model"),
            "command": "POST /train",
            "job_id": job_id,
            "history": result.history,
        }
        if gated(activate):  # "always" skips the gate; recorded before publishing, so a resumed run agrees
            verdict = quality_gate(registry, result, active_at_start or None)
            gate = store.set_once(job_id, "gate", verdict.to_dict())  # an earlier run's verdict, if it gave one
            store.append_event(job_id, "gate", gate)
            log.info("job %s: quality gate %s: %s", job_id, gate["result"], gate["reason"])
        config = save_model(registry, result, model_id=model_id, training=training)
        store.append_event(job_id, "published", {"model_id": model_id})
    activated, note, canary = release(registry, aliases, model_id, activate, gate, active_at_start or None)
    if canary is not None:
        store.append_event(job_id, "canary", canary)
    return Publication(model_id=model_id, metrics=config["metrics"], activated=activated, note=note)


def _train_config(params: dict[str, Any], max_threads: int) -> TrainConfig:
    """The job's hyperparameters; its `threads` may lower the worker's cap, never raise it."""
    cfg = TrainConfig.from_dict(params)
    cfg.threads = min(cfg.threads or max_threads, max_threads)
    return cfg


def _end(store: JobStore, claim: Claim, stopper: Stopper, state: str, **values: Any) -> None:
    """Record the outcome (waiting out a Redis outage), then free the corpus and the training state."""
    if not _retry(lambda: store.finish(claim, state, **values), stopper):
        log.warning("job %s: another worker holds it now; outcome %s not recorded here", claim.job_id, state)
        return
    remove_job_files(store.models_dir, claim.job_id)
    log.info("job %s %s", claim.job_id, state)


def _pause(store: JobStore, claim: Claim, stopper: Stopper) -> None:
    """Record the pause (the training state is saved where it stopped, and stays for the resume); the worker is free."""
    if _retry(lambda: store.mark_paused(claim), stopper):
        log.info("job %s paused", claim.job_id)
    else:
        log.warning("job %s: another worker holds it now, or it ended; not paused here", claim.job_id)


def _retry(action: Callable[[], T], stopper: Stopper) -> T:
    """Run a store call until Redis answers; give up only when the worker that started us is gone."""
    return until_available(action, give_up=lambda: os.getppid() != stopper.parent_pid, who=f"job {stopper.job_id}")


def _limit_resources(threads: int | None, nice: int) -> None:
    """Few torch threads and a lower CPU priority: training must not starve serving on this machine.

    Niced jobs also take Linux's SCHED_IDLE policy: the scheduler then preempts them the moment a
    serving thread wakes, where nice alone lets a training thread finish its time slice first (a
    stream's p99 gap between tokens while training: 2.1-3.3 ms niced, 1.2 ms at idle priority,
    against 0.4-0.7 ms idle; bench/train_interference.py)."""
    _die_with_parent()
    if threads:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before the first inter-op use
            torch.set_num_interop_threads(1)
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _die_with_parent() -> None:
    """Linux: SIGKILL us when the worker dies, so an orphan never keeps training (or publishing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s job %(name)s: %(message)s")
    return run_job(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
