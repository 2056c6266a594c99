"""The job store contract, against both stores: the file store and a real redis-server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.errors import JobConflict, JobNotFound, StoreUnavailable
from jobs.files import corpus_path
from jobs.pointer import RedisPointer
from jobs.records import validate_job_id
from jobs.redis_client import connect_redis
from jobs.redis_store import RedisStore
from jobs.store import JobStore
from tests.jobs.conftest import assert_job_files_removed, corpus, tiny_params
from tests.redis_server import RedisServer


def test_submit_queues_the_job_and_keeps_the_corpus_in_the_models_folder(store: JobStore, models_dir: Path) -> None:
    first = store.submit(tiny_params(), corpus())
    second = store.submit(tiny_params(), corpus())

    assert store.get(first.id).state == "queued"
    assert store.queue_position(first.id) == 1
    assert store.queue_position(second.id) == 2
    assert corpus_path(models_dir, first.id).read_text(encoding="utf-8") == corpus()
    assert [e.kind for e in store.events(first.id)] == ["queued"]
    assert [r.id for r in store.list_jobs()] == [second.id, first.id]  # newest first
    json.dumps(store.get(first.id).to_dict())  # a record is plain JSON


def test_unknown_and_malformed_job_ids_are_not_found(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get("job-20250101120000123-abcdef")
    with pytest.raises(JobNotFound, match="job ids look like"):
        validate_job_id("../../etc/passwd")


def test_a_claimed_job_runs_and_finishes_once(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and claim.job_id == job.id

    record = store.start(claim)
    assert record is not None and record.state == "running" and record.attempts == 1
    assert store.queue_position(job.id) is None
    assert store.heartbeat(claim)
    store.append_event(job.id, "progress", {"step": 1})
    assert store.finish(claim, "succeeded", model_id="tiny-x", activated=True)
    assert not store.finish(claim, "failed", error="twice")  # a final state is final

    done = store.get(job.id)
    assert (done.state, done.model_id, done.activated, done.error) == ("succeeded", "tiny-x", True, None)
    assert done.finished is not None
    assert [e.kind for e in store.events(job.id)] == ["queued", "progress", "done"]
    assert store.list_jobs(state="succeeded")[0].id == job.id
    assert store.list_jobs(state="queued") == []
    assert store.claim("w1", block_s=0.2) is None  # nothing left to run


def test_events_after_an_id_and_blocking_for_the_next(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    first = store.events(job.id)[0]
    assert store.events(job.id, after=first.id) == []

    started = time.monotonic()
    assert store.events(job.id, after=first.id, block_s=0.3) == []
    assert time.monotonic() - started >= 0.25

    store.append_event(job.id, "epoch", {"epoch": 1, "val_loss": 2.5})
    (event,) = store.events(job.id, after=first.id, block_s=1.0)
    assert (event.kind, event.data) == ("epoch", {"epoch": 1, "val_loss": 2.5})


def test_cancelling_a_queued_job_is_immediate(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    record = store.cancel(job.id)

    assert record.state == "cancelled"
    assert store.events(job.id)[-1].kind == "cancelled"
    assert_job_files_removed(store, job.id)
    claim = store.claim("w1", block_s=0.2)
    assert claim is None or store.start(claim) is None  # nobody runs a cancelled job
    with pytest.raises(JobConflict, match="already cancelled"):
        store.cancel(job.id)


def test_cancelling_a_running_job_asks_its_worker_to_stop(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and store.start(claim) is not None

    record = store.cancel(job.id)
    assert record.state == "running" and record.cancel_requested
    assert store.stop_requested(job.id) == "cancel"
    assert store.finish(claim, "cancelled")
    assert store.get(job.id).state == "cancelled"


def test_pausing_a_queued_job_is_immediate_and_resuming_queues_it_again(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    other = store.submit(tiny_params(), corpus())

    record = store.pause(job.id)
    assert record.state == "paused" and store.get(job.id).state == "paused"
    assert store.pause(job.id).state == "paused"  # pausing again changes nothing
    assert [e.kind for e in store.events(job.id)] == ["queued", "paused"]
    assert store.queue_position(job.id) is None and store.queue_position(other.id) == 1
    claim = store.claim("w1", block_s=0.5)
    assert claim is not None and claim.job_id == other.id  # nobody runs a paused job
    assert store.claim("w1", block_s=0.2) is None

    assert store.resume(job.id).state == "queued"
    assert store.events(job.id)[-1].kind == "resumed"
    again = store.claim("w2", block_s=1.0)
    assert again is not None and again.job_id == job.id and store.start(again) is not None
    assert store.claim("w3", block_s=0.2) is None  # one queue entry: resumed once, run once
    with pytest.raises(JobConflict, match="not paused"):
        store.resume(job.id)


def test_pausing_a_running_job_asks_its_worker_to_save_and_free_itself(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and store.start(claim) is not None

    record = store.pause(job.id)
    assert record.state == "running" and record.pause_requested
    assert store.stop_requested(job.id) == "pause"
    store.update(job.id, saved_epoch=1, saved_step=7)  # what the training process records as it saves
    assert store.mark_paused(claim)
    record = store.get(job.id)
    assert (record.state, record.worker, record.pause_requested, record.attempts) == ("paused", None, False, 0)
    assert store.events(job.id)[-1].data == {"state": "paused", "saved_epoch": 1, "saved_step": 7}
    assert not store.heartbeat(claim)  # the worker is free
    assert store.claim("w2", block_s=0.3) is None

    assert store.resume(job.id).state == "queued"
    again = store.claim("w2", block_s=1.0)
    assert again is not None and again.job_id == job.id
    assert store.start(again) is not None and store.stop_requested(job.id) is None
    assert store.finish(again, "succeeded")
    with pytest.raises(JobConflict, match="already succeeded"):
        store.pause(job.id)


def test_a_paused_job_can_be_cancelled_at_once_and_a_pause_withdrawn_before_it_lands(store: JobStore) -> None:
    paused = store.submit(tiny_params(), corpus())
    store.pause(paused.id)
    assert store.cancel(paused.id).state == "cancelled"

    running = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and claim.job_id == running.id and store.start(claim) is not None
    store.pause(running.id)
    record = store.resume(running.id)  # changed its mind before the worker paused
    assert (record.state, record.pause_requested) == ("running", False)
    assert store.stop_requested(running.id) is None


def test_a_job_handed_back_is_taken_before_newer_jobs(store: JobStore) -> None:
    first = store.submit(tiny_params(), corpus())
    second = store.submit(tiny_params(), corpus())
    claim = store.claim("w1", block_s=1.0)
    assert claim is not None and claim.job_id == first.id and store.start(claim) is not None

    assert store.hand_back(claim, "the worker was stopped")
    assert store.get(first.id).state == "queued"
    requeued = store.events(first.id)[-1]
    assert requeued.kind == "requeued"
    assert requeued.data == {
        "state": "queued",
        "reason": "the worker was stopped",
        "worker": "w1",
        "saved_epoch": 0,
        "saved_step": 0,
    }
    assert not store.heartbeat(claim)  # the old claim is over

    again = store.claim("w2", block_s=1.0)
    assert again is not None and again.job_id == first.id
    record = store.start(again)
    assert record is not None and record.attempts == 1  # a hand-back is not a failed attempt
    assert [e.kind for e in store.events(first.id)].count("requeued") == 1  # taking it back is no takeover
    later = store.claim("w2", block_s=1.0)
    assert later is not None and later.job_id == second.id


def test_a_silent_worker_loses_its_job_to_another(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    dead = store.claim("dead", block_s=1.0)
    assert dead is not None and store.start(dead) is not None
    store.update(job.id, saved_epoch=2, saved_step=40)  # what the training process records as it saves its state
    assert store.claim("alive", block_s=0.1) is None  # the lease (1 s in these tests) still holds

    time.sleep(1.3)
    taken = store.claim("alive", block_s=1.0)
    assert taken is not None and taken.job_id == job.id
    requeued = store.events(job.id)[-1]  # the takeover says which worker was lost and where the job resumes
    assert requeued.kind == "requeued"
    assert (requeued.data["state"], requeued.data["worker"], requeued.data["saved_epoch"]) == ("queued", "dead", 2)
    assert "worker dead stopped heartbeating" in requeued.data["reason"]
    assert "state saved at step 40 (2 epochs done)" in requeued.data["reason"]
    record = store.start(taken)
    assert record is not None and record.attempts == 2
    assert not store.heartbeat(dead)
    assert not store.finish(dead, "succeeded")  # the dead worker, if it wakes up, cannot end the job
    assert store.finish(taken, "succeeded")


def test_set_once_keeps_the_first_value(store: JobStore) -> None:
    job = store.submit(tiny_params(), corpus())
    assert store.set_once(job.id, "active_at_start", "") == ""
    assert store.set_once(job.id, "active_at_start", "other") == ""


# ---------------------------------------------------------------------------- Redis only


def test_an_idempotency_key_binds_one_job_even_when_requests_race(store: JobStore) -> None:
    candidates = [f"job-2025010112000012{i}-abcdef" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        bound = list(pool.map(lambda job_id: store.remember_request("retry-me", job_id), candidates))
    assert len(set(bound)) == 1 and bound[0] in candidates  # one winner; every request is told which
    assert store.remember_request("retry-me", candidates[-1]) == bound[0]
    assert store.remember_request("another key", candidates[0]) == candidates[0]

    store.forget_request("retry-me", "job-20250101120000999-abcdef")  # not its job: kept
    assert store.remember_request("retry-me", candidates[-1]) == bound[0]
    store.forget_request("retry-me", bound[0])  # its job was never stored: the key is free again
    assert store.remember_request("retry-me", candidates[-1]) == candidates[-1]


def test_events_carry_the_time_they_were_recorded(store: JobStore) -> None:
    before = time.time()
    job = store.submit(tiny_params(), corpus())
    [queued] = store.events(job.id)
    assert queued.at is not None and before - 1 <= queued.at <= time.time() + 1


def test_redis_pointer_compare_and_set_and_activated_notice(redis_server: RedisServer, prefix: str) -> None:
    client = connect_redis(redis_server.url)
    pointer = RedisPointer(client, prefix=prefix)
    notices = client.pubsub()
    notices.subscribe(pointer.channel)
    notices.get_message(timeout=1.0)  # the subscribe confirmation

    assert pointer.get() is None
    assert pointer.compare_and_set(None, "model-a")
    assert not pointer.compare_and_set(None, "model-b")  # lost: the pointer is not empty any more
    assert pointer.compare_and_set("model-a", "model-b")
    assert pointer.get() == "model-b"
    assert pointer.compare_and_set("model-b", "model-b")  # already there: no move, no notice

    received = []
    while (message := notices.get_message(timeout=0.5)) is not None:
        if message["type"] == "message":
            received.append(message["data"])
    assert received == ["model-a", "model-b"]
    notices.close()
    client.close()


def test_redis_outage_is_retryable_and_nothing_is_lost(tmp_path: Path, models_dir: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = RedisStore(connect_redis(server.url), models_dir, lease_s=1.0)
        pointer = RedisPointer(store.redis)
        job = store.submit(tiny_params(), corpus())
        assert pointer.compare_and_set(None, "model-a")

        server.stop()
        with pytest.raises(StoreUnavailable, match="retry"):
            store.get(job.id)
        with pytest.raises(StoreUnavailable):
            store.submit(tiny_params(), corpus())
        with pytest.raises(StoreUnavailable):
            pointer.compare_and_set("model-a", "model-b")
        assert pointer.get() == "model-a"  # the last known value keeps listings working

        server.start()  # same port, same folder: the append-only file brings everything back
        assert store.get(job.id).state == "queued"
        claim = store.claim("w1", block_s=1.0)
        assert claim is not None and claim.job_id == job.id
        assert pointer.compare_and_set("model-a", "model-b")
    finally:
        server.stop()
