"""Files and fine-tuning jobs through the `openai` SDK in Redis mode: a real redis-server, two API replicas
and a separate worker process. A file uploaded through one replica, and a job created there, are
followed, retried and served through the other."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import BASE_MODEL, TEXT, Cluster, Process, redis_cluster
from tests.jobs_support import FINAL_STATES, TINY

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RECIPE = {k: v for k, v in TINY.items() if k not in ("epochs", "batch_size")}


def chat_jsonl(lines: int) -> bytes:
    text = [line.strip() for line in TEXT.splitlines() if line.strip()]
    rows = [
        {
            "messages": [
                {"role": "user", "content": text[2 * i % len(text)]},
                {"role": "assistant", "content": text[(2 * i + 1) % len(text)]},
            ]
        }
        for i in range(lines)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("fine-tuning-redis")
    with redis_cluster(root, root / "models") as (cluster, _):
        cluster.start_api("api-1")
        cluster.start_api("api-2")
        cluster.start_worker("worker-1")
        yield cluster


def sdk(api: Process) -> OpenAI:
    return OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)


def test_a_job_created_through_one_replica_is_followed_through_the_other(cluster: Cluster) -> None:
    api1, api2 = (p for p in cluster.processes if p.url)
    one, two = sdk(api1), sdk(api2)

    file = one.files.create(file=("chat.jsonl", chat_jsonl(40)), purpose="fine-tune")
    assert two.files.wait_for_processing(file.id, poll_interval=0.1).status == "processed"  # the other replica
    assert [f.id for f in two.files.list()] == [file.id]

    key = {"Idempotency-Key": "redis-create-1"}
    created = one.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=file.id,
        suffix="chat",
        hyperparameters={"n_epochs": 2, "batch_size": 4},
        extra_body=RECIPE,
        extra_headers=key,
    )
    retried = two.fine_tuning.jobs.create(  # a retry that reaches the other replica: the same job
        model=BASE_MODEL, training_file=file.id, extra_body=RECIPE, extra_headers=key
    )
    assert retried.id == created.id
    assert [j.id for j in two.fine_tuning.jobs.list()] == [created.id]

    deadline = time.monotonic() + 180
    while (job := two.fine_tuning.jobs.retrieve(created.id)).status not in FINAL_STATES:
        assert time.monotonic() < deadline, f"still {job.status}"
        time.sleep(0.2)
    assert job.status == "succeeded", (job.error, cluster.logs())
    assert job.fine_tuned_model is not None and job.fine_tuned_model.startswith(f"{BASE_MODEL}-ft-chat-")

    events = list(two.fine_tuning.jobs.list_events(created.id, limit=4))
    assert events[0].message == "The job has successfully completed" and events[-1].message == "Job queued"
    assert any(e.type == "metrics" for e in events) and len({e.id for e in events}) == len(events)
    checkpoints = [c.fine_tuned_model_checkpoint for c in one.fine_tuning.jobs.checkpoints.list(created.id)]
    assert len(checkpoints) == 2 and all(c.startswith(f"{job.fine_tuned_model}-ckpt-step-") for c in checkpoints)
    answer = two.chat.completions.create(model=checkpoints[-1], messages=[{"role": "user", "content": "Hi"}])
    assert answer.model == checkpoints[-1]  # the first epoch's model, served by the other replica

    for client in (one, two):  # served by either replica at once, without being activated
        answer = client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "Speak"}], max_tokens=4
        )
        assert answer.model == job.fine_tuned_model
    assert httpx.get(f"{api2.url}/readyz").json()["model"] == BASE_MODEL
    assert (cluster.models_dir / job.fine_tuned_model).is_dir() and Path(cluster.models_dir / "files").is_dir()


def test_a_job_cancelled_through_one_replica_stops_and_the_other_shows_it(cluster: Cluster) -> None:
    api1, api2 = (p for p in cluster.processes if p.url)
    one, two = sdk(api1), sdk(api2)
    file = one.files.create(file=("plays.txt", TEXT.encode()), purpose="fine-tune")
    job = two.fine_tuning.jobs.create(
        model="textgen-char", training_file=file.id, extra_body={**TINY, "epochs": 10_000}
    )
    deadline = time.monotonic() + 60
    while one.fine_tuning.jobs.retrieve(job.id).status != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    one.fine_tuning.jobs.cancel(job.id)
    deadline = time.monotonic() + 60
    while (status := two.fine_tuning.jobs.retrieve(job.id).status) != "cancelled":
        assert status == "running" and time.monotonic() < deadline, status
        time.sleep(0.2)
    assert httpx.get(f"{api1.url}/train/{job.id}").json()["state"] == "cancelled"
    assert two.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message == "The job was cancelled"


def test_a_job_paused_through_one_replica_is_resumed_through_the_other(cluster: Cluster) -> None:
    """The pause reaches the worker through Redis: it saves the state and takes the next job; the resume,
    sent to the other replica, queues the job again, and it finishes."""
    api1, api2 = (p for p in cluster.processes if p.url)
    one, two = sdk(api1), sdk(api2)
    file = one.files.create(file=("plays.txt", (TEXT * 4).encode()), purpose="fine-tune")
    job = one.fine_tuning.jobs.create(
        model="textgen-char", training_file=file.id, extra_body={**TINY, "epochs": 10_000, "max_steps": 2500}
    )
    deadline = time.monotonic() + 60
    while two.fine_tuning.jobs.retrieve(job.id).status != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)
    one.fine_tuning.jobs.pause(job.id)
    deadline = time.monotonic() + 60
    while (status := two.fine_tuning.jobs.retrieve(job.id).status) != "paused":
        assert status == "running" and time.monotonic() < deadline, status
        time.sleep(0.1)
    after = one.fine_tuning.jobs.create(model="textgen-char", training_file=file.id, extra_body={**TINY, "epochs": 1})
    deadline = time.monotonic() + 120
    while (status := one.fine_tuning.jobs.retrieve(after.id).status) not in FINAL_STATES:
        assert time.monotonic() < deadline, status  # the paused job freed the only worker
        time.sleep(0.2)
    assert status == "succeeded"
    assert two.fine_tuning.jobs.retrieve(job.id).status == "paused"

    assert two.fine_tuning.jobs.resume(job.id).status == "queued"
    deadline = time.monotonic() + 180
    while (done := one.fine_tuning.jobs.retrieve(job.id)).status not in FINAL_STATES:
        assert time.monotonic() < deadline, done.status
        time.sleep(0.2)
    assert done.status == "succeeded", (done.error, cluster.logs())
    native = httpx.get(f"{api2.url}/train/{job.id}").json()
    assert native["metrics"]["steps"] == 2500  # max_steps, across the pause: no step lost or repeated
    messages = [e.message for e in two.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert any(m.startswith("Job paused at step") for m in messages)
    assert any(m.startswith("Job resumed") for m in messages)
