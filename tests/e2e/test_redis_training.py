"""Redis mode end to end: a real redis-server, two API replicas and two workers, all real processes.

The tests share one cluster and run in file order; each leaves it serving some model, with two
idle workers.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jobs.pointer import RedisPointer
from tests.corpora import chat_jsonl
from tests.e2e.conftest import (
    BASE_MODEL,
    TEXT,
    Cluster,
    Process,
    SlowStream,
    get_job,
    job_events,
    publish_tiny_model,
    published_for,
    redis_cluster,
    redis_pointer,
    serving,
    submit,
    wait_for_event,
    wait_for_job,
    wait_serving,
)
from tests.e2e.test_aliases_redis import canary_seen
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@dataclass
class RedisCluster:
    cluster: Cluster
    redis: RedisServer
    apis: list[Process]
    workers: list[Process]

    @property
    def models_dir(self) -> Path:
        return self.cluster.models_dir

    def pointer(self) -> RedisPointer:
        return redis_pointer(self.redis)


@pytest.fixture(scope="module")
def rc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    root = tmp_path_factory.mktemp("redis-e2e")
    with redis_cluster(root, root / "models") as (cluster, redis):
        apis = [cluster.start_api("api-1"), cluster.start_api("api-2")]
        workers = [cluster.start_worker("worker-1"), cluster.start_worker("worker-2")]
        yield RedisCluster(cluster, redis, apis, workers)


@pytest.fixture(autouse=True)
def _logs_on_failure(rc: RedisCluster) -> Iterator[None]:
    yield
    print(rc.cluster.logs())  # pytest shows a test's captured output only when it fails


def test_a_job_swaps_both_replicas_while_a_stream_finishes_on_the_old_version(rc: RedisCluster) -> None:
    api1, api2 = rc.apis
    for api in rc.apis:  # production's model is unchanged; the canary only shares its traffic
        assert httpx.get(f"{api.url}/readyz", timeout=10).json()["model"] == BASE_MODEL
    assert rc.pointer().get() == BASE_MODEL
    stream = SlowStream.open(api1, max_tokens=5000)
    assert stream.started_tokens.wait(30)

    job = submit(api2, name="swap-v2")
    done = wait_for_job(api2, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert (done["model_id"], done["activated"]) == ("swap-v2", True)
    wait_serving(rc.apis, "swap-v2", timeout=5.0)  # both replicas, within 5 s of the publish

    assert stream.ended_at is None  # the stream is still in flight on the old version
    stream.finish()
    kinds = [kind for kind, _ in stream.events]
    assert "error" not in kinds and kinds[-1] == "done"
    assert stream.events[-1][1]["model"] == BASE_MODEL
    assert published_for(rc.models_dir, job["id"]) == ["swap-v2"]


def test_a_worker_killed_mid_job_is_replaced_and_the_job_publishes_once(rc: RedisCluster) -> None:
    api = rc.apis[0]
    job = submit(api, name="survivor", epochs=24)
    wait_for_event(api, job["id"], "checkpoint")  # an epoch's state is saved
    pid = int(get_job(api, job["id"])["worker"].rsplit("-", 2)[1])
    victim = next(w for w in rc.workers if w.proc.pid == pid)

    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    done = wait_for_job(api, job["id"], timeout=180)

    assert done["state"] == "succeeded", done["error"]
    assert time.monotonic() - killed < 180
    assert done["attempts"] == 2 and done["worker"] is None
    assert published_for(rc.models_dir, job["id"]) == ["survivor"]
    events = list(job_events(api, job["id"]))
    restarted = [i for i, (kind, _) in enumerate(events) if kind == "started"][-1]
    first_epoch_after = next(data for kind, data in events[restarted:] if kind == "epoch")
    assert first_epoch_after["epoch"] >= 2  # resumed from the saved epoch, not from scratch
    wait_serving(rc.apis, "survivor", timeout=5.0)

    rc.workers.remove(victim)
    rc.workers.append(rc.cluster.start_worker("worker-3"))


def test_cancelling_a_running_job(rc: RedisCluster) -> None:
    api = rc.apis[1]
    before = serving(api)
    job = submit(api, name="cancelled", epochs=1000)
    wait_for_event(api, job["id"], "epoch")

    response = httpx.delete(f"{api.url}/train/{job['id']}", timeout=10)
    assert response.status_code == 202 and response.json()["cancel_requested"]
    asked = time.monotonic()
    done = wait_for_job(api, job["id"], timeout=30)

    assert done["state"] == "cancelled" and time.monotonic() - asked < 10
    assert httpx.get(f"{api.url}/models/cancelled", timeout=10).status_code == 404
    assert [kind for kind, _ in job_events(api, job["id"])][-1] == "cancelled"
    assert serving(api) == before


def test_a_checkpoint_that_fails_validation_is_refused_and_the_old_model_keeps_serving(rc: RedisCluster) -> None:
    api1, api2 = rc.apis
    current = serving(api1)
    publish_tiny_model(rc.models_dir, "broken", nan=True)

    response = httpx.post(f"{api1.url}/models/broken/activate", timeout=30)
    assert response.status_code == 422 and "refused" in response.json()["error"]["message"]
    assert serving(api1) == serving(api2) == current

    pointer = rc.pointer()  # a promotion from elsewhere (say, a worker): the replicas refuse it too
    assert pointer.compare_and_set(current, "broken")
    time.sleep(2.5)  # more than one reconcile
    assert serving(api1) == serving(api2) == current
    assert pointer.compare_and_set("broken", current)


def test_a_job_finishing_late_does_not_overwrite_a_newer_activation(rc: RedisCluster) -> None:
    api1, api2 = rc.apis
    job = submit(api1, name="late-v3", epochs=12, activate="always")  # past the quality gate: the CAS decides
    wait_for_event(api1, job["id"], "epoch")

    response = httpx.post(f"{api2.url}/models/{BASE_MODEL}/activate", timeout=30)  # the rollback
    assert response.status_code == 200, response.text
    wait_serving(rc.apis, BASE_MODEL, timeout=5.0)
    done = wait_for_job(api1, job["id"])

    assert done["state"] == "succeeded", done["error"]
    assert (done["model_id"], done["activated"]) == ("late-v3", False)
    assert BASE_MODEL in done["note"]
    time.sleep(1.5)
    for api in rc.apis:  # production's model is unchanged; the canary only shares its traffic
        assert httpx.get(f"{api.url}/readyz", timeout=10).json()["model"] == BASE_MODEL
    assert rc.pointer().get() == BASE_MODEL
    assert rc.pointer().get() == BASE_MODEL


def test_a_redis_restart_mid_job_loses_nothing(rc: RedisCluster) -> None:
    api1, api2 = rc.apis
    job = submit(api1, name="after-outage", epochs=16)
    wait_for_event(api1, job["id"], "epoch")

    rc.redis.stop()
    try:
        assert serving(api1) == serving(api2) == BASE_MODEL  # generation keeps working
        refused = httpx.post(f"{api1.url}/train", json={"text": TEXT}, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "service_unavailable"
        activate = httpx.post(f"{api2.url}/models/swap-v2/activate", timeout=30)
        assert activate.status_code == 503
        assert serving(api2) == BASE_MODEL
        time.sleep(1.0)
    finally:
        rc.redis.start()

    done = wait_for_job(api1, job["id"], timeout=120)
    assert done["state"] == "succeeded", done["error"]
    assert done["activated"] is True
    wait_serving(rc.apis, "after-outage", timeout=10.0)
    assert published_for(rc.models_dir, job["id"]) == ["after-outage"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text": " \n\n "}, 422, "empty"),
        ({"text": "\x00\x01binary\x02" * 100}, 422, "binary"),
        ({"text": TEXT * 40}, 413, "TEXTGEN_MAX_CORPUS_BYTES"),
        ({"text": '{"messages": [{"content": "x"}]}\n'}, 422, 'line 1: message 1 has no "role"'),
    ],
)
def test_bad_corpora_are_refused_before_they_reach_the_queue(
    rc: RedisCluster, body: dict, status: int, words: str
) -> None:
    api = rc.apis[0]
    response = httpx.post(f"{api.url}/train", json=body, timeout=30)
    assert response.status_code == status and words in response.json()["error"]["message"]


def test_a_chat_job_through_one_replica_is_followed_through_the_other(rc: RedisCluster) -> None:
    api1, api2 = rc.apis
    chats = chat_jsonl(TEXT).splitlines(keepends=True)
    body = {"text": "".join(chats[:-10]), "validation_text": "".join(chats[-10:]), "base_model": BASE_MODEL}
    job = submit(api1, **body, name="chat-v1", activate=False)
    assert job["params"]["data_format"] == "chat"

    done = wait_for_job(api2, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["metrics"]["val_loss"] > 0 and done["activated"] is False
    model = httpx.get(f"{api2.url}/models/chat-v1", timeout=10).json()
    assert model["training"]["recipe"]["data_format"] == "chat"
    assert published_for(rc.models_dir, job["id"]) == ["chat-v1"]


def test_a_job_with_activate_canary_makes_its_model_productions_canary_on_both_replicas(rc: RedisCluster) -> None:
    api1, api2 = rc.apis
    activated = httpx.post(f"{api1.url}/models/{BASE_MODEL}/activate", timeout=30)  # random weights: the job beats it
    assert activated.status_code == 200, activated.text
    wait_serving(rc.apis, BASE_MODEL, timeout=5.0)

    job = submit(api1, name="canary-v1", activate="canary:0.3")
    done = wait_for_job(api2, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["gate"]["result"] == "passed", done["gate"]
    assert (done["model_id"], done["activated"]) == ("canary-v1", False)
    assert "serving 30% of production's traffic as its canary" in done["note"]
    canaries = [data["canary"] for kind, data in job_events(api1, job["id"]) if kind == "canary"]
    assert canaries == [{"model": "canary-v1", "weight": 0.3}]
    for api in rc.apis:  # the Redis aliases, followed by both replicas
        canary_seen(api, {"model": "canary-v1", "weight": 0.3})
    for api in rc.apis:  # production's model is unchanged; the canary only shares its traffic
        assert httpx.get(f"{api.url}/readyz", timeout=10).json()["model"] == BASE_MODEL
    assert rc.pointer().get() == BASE_MODEL

    # a job's plain activation is PUT /models/aliases/production {"model": id}: it clears the canary
    job = submit(api2, name="plain-v1", activate="always")
    done = wait_for_job(api1, job["id"])
    assert (done["state"], done["activated"]) == ("succeeded", True), done["error"]
    wait_serving(rc.apis, "plain-v1", timeout=5.0)
    for api in rc.apis:
        canary_seen(api, None)
    assert rc.pointer().get() == "plain-v1"
