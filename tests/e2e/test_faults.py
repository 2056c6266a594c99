"""Faults injected into real processes: broken checkpoints, an API killed during a swap, Redis killed
with jobs queued and running, the disk filling up during a checkpoint write.

Each test states what a user must still see: the old model serving, a consistent active model after
a restart, every job run once to publication, nothing half-published.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import (
    MODEL_A,
    MODEL_B,
    Server,
    models_template,  # noqa: F401 - the fixture (tiny-a active, tiny-b, tiny-nan), used under its name below
    start_server,
    stop_server,
)
from tests.broken_checkpoints import BREAKAGES
from tests.e2e.conftest import (
    BASE_MODEL,
    TINY_JOB,
    get_job,
    job_events,
    published_for,
    redis_cluster,
    redis_pointer,
    serving,
    submit,
    wait_for_event,
    wait_for_job,
)
from tests.mounts import fill, small_tmpfs

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- broken checkpoints


@pytest.fixture(scope="module")
def server(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    """`textgen serve` on a models folder with a broken copy of tiny-b for each breakage."""
    root = tmp_path_factory.mktemp("faults")
    models = root / "models"
    shutil.copytree(models_template, models)
    for name, breakage in BREAKAGES.items():
        shutil.copytree(models / MODEL_B, models / name)
        breakage(models / name)
    srv = start_server(models, root)
    yield srv
    stop_server(srv)


def generate(url: str) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={"prompt": "To be", "max_tokens": 4}, timeout=30)


@pytest.mark.parametrize("broken", list(BREAKAGES))
def test_a_broken_checkpoint_is_refused_and_the_old_model_keeps_serving(server: Server, broken: str) -> None:
    before = httpx.get(f"{server.url}/readyz", timeout=10).json()["model"]
    refused = httpx.post(f"{server.url}/models/{broken}/activate", timeout=30)
    assert refused.status_code in (404, 422), refused.text
    assert refused.json()["error"]["request_id"]
    assert str(server.log_path.parent) not in refused.text  # the file is named, not the server's path
    assert httpx.get(f"{server.url}/readyz", timeout=10).json()["model"] == before
    answer = generate(server.url)
    assert answer.status_code == 200 and answer.json()["model"] == before
    assert (server.log_path.parent / "models" / "ACTIVE").read_text().strip() == before
    assert "Traceback" not in server.log()


def test_a_checkpoint_folder_renamed_during_its_load_is_refused_or_served_whole(server: Server) -> None:
    """Whichever wins the race, the server answers 200 or a refusal, and serves what /readyz names."""
    models = server.log_path.parent / "models"
    shutil.copytree(models / MODEL_B, models / "moving")
    answers: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{server.url}/models/moving/activate", timeout=30))
    )
    thread.start()
    os.rename(models / "moving", models / "moved")
    thread.join(30)
    (answer,) = answers
    assert answer.status_code in (200, 404, 422), answer.text
    active = httpx.get(f"{server.url}/readyz", timeout=10).json()["model"]
    assert generate(server.url).json()["model"] == active
    assert active == ("moving" if answer.status_code == 200 else MODEL_A)
    httpx.post(f"{server.url}/models/{MODEL_A}/activate", timeout=30).raise_for_status()


# ---------------------------------------------------------------------------- the API killed during a swap


def test_an_api_killed_during_a_swap_restarts_onto_a_consistent_active_model(
    models_template: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_template, models)
    for attempt, delay in enumerate([0.0, 0.005, 0.02]):
        srv = start_server(models, tmp_path)
        target = MODEL_B if attempt % 2 == 0 else MODEL_A
        thread = threading.Thread(target=_activate_quietly, args=(srv.url, target), daemon=True)
        thread.start()
        time.sleep(delay)
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(10)
        thread.join(30)

        restarted = start_server(models, tmp_path)
        try:
            pointer = (models / "ACTIVE").read_text().strip()
            assert pointer in (MODEL_A, MODEL_B)
            assert httpx.get(f"{restarted.url}/readyz", timeout=10).json()["model"] == pointer
            assert generate(restarted.url).json()["model"] == pointer
            assert not list(models.glob(".tmp-*")) and not list(models.glob(".ACTIVE.tmp-*"))
        finally:
            stop_server(restarted)


def _activate_quietly(url: str, model_id: str) -> None:
    with contextlib.suppress(httpx.TransportError):  # the server is killed under the request
        httpx.post(f"{url}/models/{model_id}/activate", timeout=30)


# ---------------------------------------------------------------------------- Redis mode: jobs under faults


@pytest.mark.redis
def test_redis_killed_with_jobs_queued_and_running_loses_none_and_publishes_each_once(tmp_path: Path) -> None:
    with redis_cluster(tmp_path, tmp_path / "models") as (cluster, redis):
        api = cluster.start_api()
        cluster.start_worker()
        jobs = [submit(api, name=f"outage-{i}", epochs=6, activate=False) for i in range(3)]
        wait_for_event(api, jobs[0]["id"], "epoch")  # one runs, two wait in the queue

        assert redis.proc is not None
        redis.proc.kill()  # SIGKILL: no shutdown, only what the AOF (fsync always) already holds
        redis.proc.wait()
        redis.proc = None
        time.sleep(1.0)
        assert serving(api) == BASE_MODEL  # generation does not need Redis
        redis.start()  # the same folder: it loads the AOF

        for i, job in enumerate(jobs):
            done = wait_for_job(api, job["id"], timeout=120)
            assert done["state"] == "succeeded", (done, cluster.logs())
            assert published_for(cluster.models_dir, job["id"]) == [f"outage-{i}"]
        listed = httpx.get(f"{api.url}/train", timeout=10).json()["jobs"]
        assert sorted(j["id"] for j in listed) == sorted(j["id"] for j in jobs)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs: a folder that fills up."""
    with small_tmpfs(tmp_path / "small") as folder:
        yield folder


@pytest.mark.redis
def test_the_disk_filling_up_during_a_checkpoint_write_fails_the_job_and_publishes_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    models = small_disk / "models"
    with redis_cluster(tmp_path, models) as (cluster, redis):
        before = {p.name for p in models.iterdir()}
        api = cluster.start_api()
        cluster.start_worker()
        fill(small_disk, leave_bytes=0)  # not even room for a corpus: refused before it is queued
        refused = httpx.post(f"{api.url}/train", json={**TINY_JOB, "name": "no-corpus"}, timeout=30)
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "insufficient_storage"
        assert httpx.get(f"{api.url}/train", timeout=10).json()["jobs"] == []

        # room for the corpus (6 KB), not for the first epoch's training state (weights + optimizer, ~50 KB)
        (small_disk / "filler").unlink()
        fill(small_disk, leave_bytes=16384)
        job = submit(api, name="no-room", epochs=3)
        done = wait_for_job(api, job["id"], timeout=90)

        assert done["state"] == "failed", done
        assert "space" in (done["error"] or "").lower(), done["error"]
        assert httpx.get(f"{api.url}/models/no-room", timeout=10).status_code == 404
        left = {p.name for p in models.iterdir()} - before - {"jobs"}
        assert not left, left  # no model folder, no .tmp-* checkpoint left behind
        assert redis_pointer(redis).get() == BASE_MODEL
        assert serving(api) == BASE_MODEL

        (small_disk / "filler").unlink()  # room again: the next job publishes
        again = wait_for_job(api, submit(api, name="room-again", epochs=1)["id"], timeout=90)
        assert again["state"] == "succeeded", again


@pytest.mark.redis
def test_a_worker_killed_during_publication_leaves_one_published_active_model(tmp_path: Path) -> None:
    with redis_cluster(tmp_path, tmp_path / "models") as (cluster, redis):
        api = cluster.start_api()
        workers = [cluster.start_worker("worker-1"), cluster.start_worker("worker-2")]
        job = submit(api, name="at-publish", epochs=12)  # about 2 s: the worker is known well before the end
        wait_for_event(api, job["id"], "epoch")
        running = get_job(api, job["id"])
        assert running["state"] == "running" and running["worker"], running
        pid = int(running["worker"].rsplit("-", 2)[1])
        assert pid in [w.proc.pid for w in workers]

        folder = cluster.models_dir / "at-publish"
        deadline = time.monotonic() + 60
        while not folder.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert folder.exists(), cluster.logs()
        os.kill(pid, signal.SIGKILL)  # the checkpoint is renamed into place; the promotion may not have run

        done = wait_for_job(api, job["id"], timeout=120)
        assert done["state"] == "succeeded", (done, cluster.logs())
        assert published_for(cluster.models_dir, job["id"]) == ["at-publish"]
        kinds = [kind for kind, _ in job_events(api, job["id"])]
        assert kinds.count("done") == 1 and kinds.count("published") <= done["attempts"], kinds
        assert redis_pointer(redis).get() == "at-publish"
        deadline = time.monotonic() + 10
        while serving(api) != "at-publish" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert serving(api) == "at-publish"
