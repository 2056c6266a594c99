"""The worker end to end on the file store: real training processes, real checkpoints, real signals."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from jobs.file_store import FileStore
from jobs.files import corpus_path, state_path
from jobs.pointer import RedisPointer
from jobs.records import JobEvent
from jobs.redis_client import client_url
from jobs.redis_store import RedisStore
from jobs.store import JobStore
from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import Registry
from lm.tokenizers import fit_tokenizer
from lm.train import STATE_JSON, TrainConfig, train
from tests.jobs.conftest import ROOT, assert_job_files_removed, corpus, tiny_params
from worker.errors import EXIT_HANDED_BACK, JobFailed, describe_exit, describe_failure
from worker.progress import Stopper
from worker.publish import save_model
from worker.runner import Runner, RunnerConfig

FAST = RunnerConfig(threads=1, nice=0, heartbeat_s=0.3, poll_s=0.2, grace_s=10.0)


def wait_for_event(store: JobStore, job_id: str, kind: str, timeout: float = 30.0) -> JobEvent:
    deadline = time.monotonic() + timeout
    after = None
    while time.monotonic() < deadline:
        for event in store.events(job_id, after=after, block_s=0.5):
            after = event.id
            if event.kind == kind:
                return event
    raise AssertionError(f"no {kind!r} event for job {job_id} within {timeout}s")


def run_in_thread(store: JobStore) -> threading.Thread:
    """A worker that takes the queued jobs and exits when the queue is empty."""
    thread = threading.Thread(target=Runner(store, FAST).run, kwargs={"burst": True}, daemon=True)
    thread.start()
    return thread


def publish_other_model(models_dir: Path, model_id: str) -> None:
    """A second, ready-made model, made active the way an operator's POST /models/{id}/activate would."""
    tokenizer = fit_tokenizer("char", corpus())
    torch.manual_seed(1)
    model = LSTMLanguageModel(ModelConfig(tokenizer.vocab_size, embedding_dim=16, hidden_dim=16, layers=1))
    training = {"recipe": {}, "corpus_sha256": "0" * 64, "corpus_bytes": 0}
    Registry(models_dir).publish(model, tokenizer, model_id=model_id, training=training, metrics={}, activate=True)


def test_a_job_trains_publishes_and_activates_its_model(file_store: FileStore, models_dir: Path) -> None:
    job = file_store.submit(tiny_params(name="sonnets-1"), corpus())

    Runner(file_store, FAST).run(burst=True)

    record = file_store.get(job.id)
    assert record.state == "succeeded", record.error
    assert (record.model_id, record.activated) == ("sonnets-1", True)
    assert record.metrics is not None and record.metrics["epochs"] == 2 and record.metrics["val_loss"] > 0
    registry = Registry(models_dir)
    assert registry.active_id() == "sonnets-1"
    assert registry.get("sonnets-1").training["job_id"] == job.id
    kinds = [e.kind for e in file_store.events(job.id)]
    assert kinds[:3] == ["queued", "started", "progress"]
    assert kinds.count("epoch") == 2 and kinds.count("checkpoint") == 2
    assert kinds[-2:] == ["published", "done"]
    epoch = next(e for e in file_store.events(job.id) if e.kind == "epoch")
    assert epoch.data["val_loss"] > 0 and isinstance(epoch.data["sample"], str) and epoch.data["sample"]
    assert not corpus_path(models_dir, job.id).exists() and not state_path(models_dir, job.id).exists()


@pytest.mark.parametrize(("native", "kernel"), [(True, "textgen"), (False, "nn.LSTM")])
def test_the_native_setting_reaches_the_jobs_training_process(
    native: bool, kernel: str, file_store: FileStore, models_dir: Path
) -> None:
    """TEXTGEN_NATIVE travels in the job's spec to its own process (not through the environment)."""
    job = file_store.submit(tiny_params(), corpus())
    Runner(file_store, dataclasses.replace(FAST, native=native)).run(burst=True)
    record = file_store.get(job.id)
    assert record.state == "succeeded" and record.metrics is not None
    assert record.metrics["lstm_kernel"] == kernel


def test_a_corpus_shorter_than_one_batch_fails_and_says_what_to_do(file_store: FileStore, models_dir: Path) -> None:
    job = file_store.submit(tiny_params(batch_size=2048), corpus())

    Runner(file_store, FAST).run(burst=True)

    record = file_store.get(job.id)
    assert record.state == "failed"
    assert record.error is not None and "shorter than one batch" in record.error and "batch_size" in record.error
    assert file_store.events(job.id)[-1].kind == "failed"
    assert Registry(models_dir).list() == []


def test_a_job_finishing_late_does_not_overwrite_a_newer_activation(file_store: FileStore, models_dir: Path) -> None:
    job = file_store.submit(tiny_params(name="late", epochs=15), corpus())
    worker = run_in_thread(file_store)
    wait_for_event(file_store, job.id, "epoch")

    publish_other_model(models_dir, "rollback")  # promoted while the job runs
    worker.join(timeout=60)

    record = file_store.get(job.id)
    assert record.state == "succeeded", record.error
    assert (record.model_id, record.activated) == ("late", False)
    assert record.note is not None and "rollback" in record.note
    registry = Registry(models_dir)
    assert registry.active_id() == "rollback"
    assert {m.model_id for m in registry.list()} == {"late", "rollback"}


def test_cancelling_a_running_job_stops_it_and_publishes_nothing(file_store: FileStore, models_dir: Path) -> None:
    job = file_store.submit(tiny_params(epochs=500), corpus())
    worker = run_in_thread(file_store)
    wait_for_event(file_store, job.id, "epoch")

    asked = time.monotonic()
    assert file_store.cancel(job.id).cancel_requested
    wait_for_event(file_store, job.id, "cancelled", timeout=10)
    assert time.monotonic() - asked < 5
    worker.join(timeout=10)

    assert file_store.get(job.id).state == "cancelled"
    assert Registry(models_dir).list() == []
    assert not state_path(models_dir, job.id).exists()


def start_local_worker(models_dir: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "worker.local", "--models-dir", str(models_dir), "--threads", "1", "--lease", "1"]
    return subprocess.Popen(command, cwd=ROOT)


def textgen_worker_command(store: RedisStore) -> list[str]:
    """`textgen worker` on the Redis store's queue, models folder and prefix, with one training thread."""
    command = [sys.executable, "-m", "textgen", "worker", "--redis-url", client_url(store.redis), "--threads", "1"]
    return command + ["--models-dir", str(store.models_dir), "--prefix", store.prefix]


def start_worker(store: JobStore) -> subprocess.Popen[bytes]:
    """A worker process with a 1-second lease: `textgen worker` on Redis, the local worker on the file store."""
    if isinstance(store, RedisStore):
        return subprocess.Popen([*textgen_worker_command(store), "--lease", "1"], cwd=ROOT)
    return start_local_worker(store.models_dir)


@pytest.mark.slow
def test_a_worker_killed_mid_job_leaves_a_requeued_event_and_elapsed_times_per_attempt(store: JobStore) -> None:
    """The takeover names the worker lost and the saved epoch the job resumes after; `elapsed_s` is the
    job's training time over both attempts and `attempt_elapsed_s` each attempt's own."""
    job = store.submit(tiny_params(epochs=2), corpus(30_000))  # an epoch takes a second or two
    worker = start_worker(store)
    try:
        wait_for_event(store, job.id, "checkpoint")
        worker.kill()  # SIGKILL, early in epoch 2, far from its saved state; the training process dies with it
        worker.wait(timeout=10)
    finally:
        worker.kill()
    time.sleep(1.5)  # past the lease: the job is there to take over

    Runner(store, FAST, name="rescuer").run(burst=True)

    record = store.get(job.id)
    assert (record.state, record.attempts) == ("succeeded", 2), record.error
    events = store.events(job.id)
    first, second = [i for i, e in enumerate(events) if e.kind == "started"]
    lost = events[first].data["worker"]
    (requeued,) = [e for e in events[first:second] if e.kind == "requeued"]
    assert requeued.data["worker"] == lost != "rescuer" and lost in requeued.data["reason"]
    resumed = next(e for e in events[second:] if e.kind == "epoch")
    assert resumed.data["epoch"] == requeued.data["saved_epoch"] + 1 >= 2  # it resumed where the event said

    timed = ("progress", "epoch")
    before = [e.data for e in events[first:second] if e.kind in timed]
    after = [e.data for e in events[second:] if e.kind in timed]
    assert all(d["elapsed_s"] == pytest.approx(d["attempt_elapsed_s"]) for d in before)  # the only attempt so far
    assert all(d["attempt_elapsed_s"] < d["elapsed_s"] for d in after)
    # the first attempt counts whole, its validation and the work after its saved state included
    assert after[0]["elapsed_s"] - after[0]["attempt_elapsed_s"] >= before[-1]["elapsed_s"] - 1e-6
    totals = [d["elapsed_s"] for d in before + after]
    assert totals == sorted(totals)  # the total never goes back
    assert record.progress is not None and record.progress["elapsed_s"] == totals[-1]
    assert_job_files_removed(store, job.id)


@pytest.mark.slow
def test_sigterm_saves_the_state_hands_the_job_back_and_another_worker_resumes(
    file_store: FileStore, models_dir: Path
) -> None:
    job = file_store.submit(tiny_params(name="resumed", epochs=6), corpus())
    worker = start_local_worker(models_dir)
    try:
        wait_for_event(file_store, job.id, "checkpoint")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
    finally:
        worker.kill()

    record = file_store.get(job.id)
    assert record.state == "queued" and record.attempts == 0
    assert file_store.events(job.id)[-1].kind == "requeued"
    assert (state_path(models_dir, job.id) / STATE_JSON).is_file()  # the last epoch's state is kept

    Runner(file_store, FAST).run(burst=True)

    record = file_store.get(job.id)
    assert record.state == "succeeded", record.error
    events = file_store.events(job.id)
    requeued = next(i for i, e in enumerate(events) if e.kind == "requeued")
    saved = [e.data["epoch"] for e in events[:requeued] if e.kind == "checkpoint"]
    first_after = next(e for e in events[requeued:] if e.kind == "epoch")
    assert first_after.data["epoch"] == saved[-1] + 1 >= 2  # resumed after the last saved epoch, none retrained
    assert record.metrics is not None and record.metrics["epochs"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("ended", [False, True], ids=["running", "already-succeeded"])
def test_the_log_says_whether_a_stopped_job_was_handed_back(
    store: JobStore, ended: bool, caplog: pytest.LogCaptureFixture
) -> None:
    job = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and store.start(claim) is not None
    if ended:  # the training process published and recorded its job just before the worker was stopped
        assert store.finish(claim, "succeeded", model_id="tiny-x", activated=True)
    caplog.set_level(logging.INFO, logger="worker.runner")

    Runner(store, FAST, name="w1").settle(claim, EXIT_HANDED_BACK)

    state = store.get(job.id).state
    handed = f"handed job {job.id} back to the queue" in caplog.text
    assert (state, handed) == (("succeeded", False) if ended else ("queued", True))
    if ended:
        assert f"job {job.id} was not handed back: it had already succeeded" in caplog.text


def test_the_log_says_when_a_failure_comes_after_the_job_ended(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    job = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and store.start(claim) is not None
    assert store.finish(claim, "succeeded", model_id="tiny-x", activated=True)
    caplog.set_level(logging.INFO, logger="worker.runner")

    Runner(store, FAST, name="w1").settle(claim, -signal.SIGKILL)  # the process died after recording its success

    assert store.get(job.id).state == "succeeded"
    assert f"job {job.id} was not marked failed: it had already succeeded" in caplog.text
    assert f"job {job.id} failed" not in caplog.text


def test_a_training_process_killed_by_the_kernel_fails_the_job_with_a_reason(
    file_store: FileStore, models_dir: Path
) -> None:
    job = file_store.submit(tiny_params(epochs=500), corpus())
    worker = start_local_worker(models_dir)
    try:
        wait_for_event(file_store, job.id, "epoch")
        os.kill(_only_child(worker.pid), signal.SIGKILL)  # what the out-of-memory killer does
        wait_for_event(file_store, job.id, "failed", timeout=15)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)

    record = file_store.get(job.id)
    assert record.state == "failed"
    assert record.error is not None and "SIGKILL" in record.error and "out of memory" in record.error


def test_the_training_process_runs_niced_at_idle_priority(file_store: FileStore, models_dir: Path) -> None:
    """Serving on the same machine keeps its latency: the job process yields every core at once."""
    job = file_store.submit(tiny_params(epochs=500), corpus())
    worker = start_local_worker(models_dir)
    try:
        wait_for_event(file_store, job.id, "epoch")
        child = _only_child(worker.pid)
        assert os.getpriority(os.PRIO_PROCESS, child) == os.getpriority(os.PRIO_PROCESS, 0) + 10
        assert os.sched_getscheduler(child) == os.SCHED_IDLE
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)


def _only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_publication_is_idempotent_per_job(models_dir: Path) -> None:
    cfg = TrainConfig(embedding_dim=8, hidden_dim=8, layers=1, seq_len=16, batch_size=4, epochs=1, threads=1)
    result = train(corpus(), cfg)
    registry = Registry(models_dir)
    training = {"recipe": cfg.to_dict(), "corpus_sha256": result.corpus_sha256, "corpus_bytes": 1, "job_id": "job-a"}

    first = save_model(registry, result, model_id="once", training=training)
    again = save_model(registry, result, model_id="once", training=training)  # a second run of the same job

    assert first == again and [m.model_id for m in registry.list()] == ["once"]
    with pytest.raises(JobFailed, match="already exists"):
        save_model(registry, result, model_id="once", training={**training, "job_id": "job-b"})


def test_failure_descriptions_tell_the_user_what_to_do() -> None:
    assert "out of memory" in describe_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert "batch_size" in describe_failure(MemoryError())
    assert "SIGKILL" in describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV)
    assert "worker's log" in describe_failure(ZeroDivisionError("boom"))


def test_sigterm_stops_training_at_the_next_step(file_store: FileStore) -> None:
    """The training loop saves its state wherever it stops, so a stopping worker waits for no epoch's end."""
    job = file_store.submit(tiny_params(), corpus())
    stopper = Stopper(file_store, job.id, os.getppid())
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stopper.install()
    try:
        assert not stopper()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper() and stopper.shutting_down and not stopper.pausing
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@pytest.mark.slow
def test_a_paused_job_frees_its_worker_and_resumes_to_the_uninterrupted_result(store: JobStore) -> None:
    """Pause mid-epoch: the state is saved at that step and the worker goes on to the next job; resumed, the
    job trains no step twice and publishes the model an uninterrupted run of the same job publishes."""
    params = tiny_params(epochs=3, seed=7)
    text = corpus(30_000)  # an epoch takes a second or two
    uninterrupted = store.submit({**params, "name": f"{params['name']}-whole", "activate": False}, text)
    Runner(store, FAST).run(burst=True)
    whole = store.get(uninterrupted.id)
    assert whole.state == "succeeded", whole.error

    job = store.submit(params, text)
    after_it = store.submit(tiny_params(), corpus())
    worker = run_in_thread(store)
    progress = wait_for_event(store, job.id, "progress")
    paused_at = store.pause(job.id)
    assert paused_at.state == "running" and paused_at.pause_requested
    paused = wait_for_event(store, job.id, "paused")
    worker.join(timeout=60)
    assert not worker.is_alive()

    record = store.get(job.id)
    assert (record.state, record.worker, record.attempts) == ("paused", None, 0)
    assert store.get(after_it.id).state == "succeeded"  # the freed worker took the next job
    assert paused.data["saved_step"] == record.saved_step > progress.data["step"]
    assert (state_path(store.models_dir, job.id) / STATE_JSON).is_file()

    assert store.resume(job.id).state == "queued"
    Runner(store, FAST).run(burst=True)
    record = store.get(job.id)
    assert record.state == "succeeded", record.error
    events = store.events(job.id)
    resumed = next(i for i, e in enumerate(events) if e.kind == "resumed")
    first_step = next(e.data["step"] for e in events[resumed:] if e.kind == "progress")
    assert first_step == paused.data["saved_step"] + 1  # went on from the step it paused at
    assert record.metrics is not None and whole.metrics is not None
    assert record.metrics["steps"] == whole.metrics["steps"]
    assert record.metrics["val_loss"] == pytest.approx(whole.metrics["val_loss"], rel=1e-6)
    assert_job_files_removed(store, job.id)


@pytest.mark.slow
@pytest.mark.redis
def test_textgen_worker_takes_jobs_from_redis(redis_store: RedisStore) -> None:
    job = redis_store.submit(tiny_params(name="from-redis"), corpus())
    command = [*textgen_worker_command(redis_store), "--burst"]

    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert finished.returncode == 0, finished.stderr
    record = redis_store.get(job.id)
    assert (record.state, record.model_id, record.activated) == ("succeeded", "from-redis", True)
    assert RedisPointer(redis_store.redis, prefix=redis_store.prefix).get() == "from-redis"


def test_textgen_worker_needs_a_redis_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TEXTGEN_REDIS_URL"}
    command = [sys.executable, "-m", "textgen", "worker", "--models-dir", str(tmp_path)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)

    assert finished.returncode == 2
    assert "TEXTGEN_REDIS_URL" in finished.stderr
