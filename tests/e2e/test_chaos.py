"""The chaos suite: the drills of a bad day, run on real processes (`textgen serve`, `textgen worker`,
`redis-server`, a read-only bind mount, a full tmpfs), each watched by a `Witness` that records every
answer the clients got. Whatever the drill, nothing is lost, no answer is a 500 or a status the
drill does not expect, and no body names the models folder or Redis's address.

docs/RELIABILITY.md ("A bad day") has a row and the measured figure for each drill; the figures are
printed (`pytest -m chaos -s`).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import MODEL_A, MODEL_B, models_template, start_server, stop_server  # noqa: F401
from tests.e2e.conftest import (
    get_job,
    job_events,
    published_for,
    redis_cluster,
    submit,
    wait_for_event,
    wait_for_job,
)
from tests.jobs_support import sse
from tests.mounts import fill, read_only, small_tmpfs
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@dataclass
class Witness:
    """Every answer the drill's clients got: its status, and its body when it is an error."""

    secrets: list[str]  # what no body may contain: the models folder, Redis's address
    answers: list[tuple[str, int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, base_url: str, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=base_url, timeout=timeout, event_hooks={"response": [self._record]})

    def _record(self, response: httpx.Response) -> None:
        body = ""
        if response.status_code >= 400:
            body = response.read().decode(errors="replace")
        with self.lock:
            self.answers.append((f"{response.request.method} {response.request.url.path}", response.status_code, body))

    def statuses(self) -> set[int]:
        return {status for _, status, _ in self.answers}

    def check(self, allowed: set[int]) -> None:
        """No status outside `allowed` (never a 500), no body naming a secret, every error in the JSON shape."""
        unexpected = [(what, status, body[:200]) for what, status, body in self.answers if status not in allowed]
        assert not unexpected, unexpected
        for what, status, body in self.answers:
            leaks = [secret for secret in self.secrets if secret in body]
            assert not leaks, (what, status, body)
            if status >= 400:
                assert '"request_id"' in body and '"error"' in body, (what, status, body)


def redis_address(redis: RedisServer) -> str:
    return redis.url.removeprefix("redis://").split("/")[0]


# ---------------------------------------------------------------------------- a worker SIGKILLed mid-epoch


def test_a_worker_killed_mid_epoch_loses_nothing_while_clients_watch(tmp_path: Path) -> None:
    with redis_cluster(tmp_path, tmp_path / "models") as (cluster, redis):
        api = cluster.start_api()
        workers = [cluster.start_worker("worker-1"), cluster.start_worker("worker-2")]
        witness = Witness([str(cluster.models_dir), redis_address(redis)])
        client = witness.client(api.url)
        job = submit(api, name="survivor", epochs=30)
        wait_for_event(api, job["id"], "checkpoint")
        running = get_job(api, job["id"])
        pid = int(running["worker"].rsplit("-", 2)[1])
        assert pid in [w.proc.pid for w in workers]

        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        resumed_at = None
        while (state := client.get(f"/train/{job['id']}").json())["state"] not in ("succeeded", "failed"):
            if resumed_at is None and state["state"] == "running" and state["attempts"] == 2:
                resumed_at = time.monotonic() - killed
            assert client.post("/generate", json={"prompt": "The ", "max_tokens": 4}).status_code == 200
            assert time.monotonic() - killed < 180, state
            time.sleep(0.2)

        assert state["state"] == "succeeded", state
        assert published_for(cluster.models_dir, job["id"]) == ["survivor"]
        events = job_events(api, job["id"])
        kinds = [kind for kind, _ in events]
        assert kinds.count("done") == 1 and kinds.count("published") == 1
        (requeued,) = [data for kind, data in events if kind == "requeued"]  # the takeover, named
        assert requeued["worker"] == running["worker"] and requeued["saved_epoch"] >= 1, requeued
        resumed = next(data for kind, data in events[kinds.index("requeued") :] if kind == "epoch")
        assert resumed["epoch"] > requeued["saved_epoch"]  # from the saved epoch, not from scratch
        witness.check({200})
        print(f"\nworker SIGKILL: resumed on the other worker {resumed_at:.1f} s after the kill; published once")


# ---------------------------------------------------------------------------- Redis SIGKILLed under streaming load


def stream_to_the_end(client: httpx.Client, max_tokens: int) -> tuple[int, str | None]:
    """(tokens generated, finish reason) of one streamed generation, as its `done` event says; (0, None)
    for a stream that ended without one."""
    body = {"prompt": "The ", "max_tokens": max_tokens, "stream": True, "temperature": 1.0, "seed": 7}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        for kind, data in sse(response.iter_lines()):
            if kind == "done":
                return data["usage"]["completion_tokens"], data["finish_reason"]
    return 0, None


def test_redis_killed_and_restarted_under_streaming_load_drops_no_stream(tmp_path: Path) -> None:
    with redis_cluster(tmp_path, tmp_path / "models") as (cluster, redis):
        api = cluster.start_api()
        cluster.start_worker()
        witness = Witness([str(cluster.models_dir), redis_address(redis)])
        job = submit(api, name="through-the-outage", epochs=20)
        wait_for_event(api, job["id"], "epoch")

        results: list[tuple[int, str | None]] = []
        clients = [witness.client(api.url, timeout=120) for _ in range(16)]

        def run(client: httpx.Client) -> None:
            for _ in range(3):
                results.append(stream_to_the_end(client, 400))

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGKILL)
        redis.proc.wait()
        redis.proc = None
        killed = time.monotonic()
        probe = witness.client(api.url)
        while probe.get("/readyz").json().get("redis") != "down":
            time.sleep(0.05)
        seen_down = time.monotonic() - killed
        during = probe.get("/train")
        assert during.status_code == 503 and during.headers["retry-after"], during.text
        time.sleep(2.0)
        redis.start()  # the same folder: it loads the AOF
        while probe.get("/readyz").json().get("redis") != "up":
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        for thread in threads:
            thread.join(180)

        assert len(results) == 48 and all(r == (400, "length") for r in results), results
        done = wait_for_job(api, job["id"], timeout=180)
        assert done["state"] == "succeeded", (done, cluster.logs())
        assert published_for(cluster.models_dir, job["id"]) == ["through-the-outage"]
        witness.check({200, 503})
        print(
            f"\nRedis SIGKILL: {len(results)}/48 streams complete; /readyz said down after {seen_down:.2f} s, "
            f"up {recovered:.1f} s after the kill (2 s down); the job published once"
        )


# ---------------------------------------------------------------------------- a read-only folder, a full disk


@pytest.fixture
def models_copy(models_template: Path, tmp_path: Path) -> Path:  # noqa: F811

    path = tmp_path / "models"
    shutil.copytree(models_template, path)
    return path


def test_a_read_only_models_folder_is_503_logged_once_and_serving_goes_on(models_copy: Path, tmp_path: Path) -> None:
    server = start_server(models_copy, tmp_path)
    try:
        witness = Witness([str(models_copy)])
        client = witness.client(server.url)
        with read_only(models_copy):
            job = {"text": "To be, or not to be, that is the question. " * 40, "epochs": 1}
            refused = [
                client.post("/train", json=job),
                client.post("/train", files={"file": ("play.txt", b"Words, words, words. " * 40)}),
                client.post(f"/models/{MODEL_B}/activate"),
                client.delete(f"/models/{MODEL_B}"),
            ]
            served = client.post("/generate", json={"prompt": "x", "max_tokens": 3})
        assert [r.status_code for r in refused] == [503] * 4
        assert {r.json()["error"]["code"] for r in refused} == {"storage_read_only"}
        assert served.status_code == 200 and served.json()["model"] == MODEL_A
        log = server.log()
        for answer in refused:
            request_id = answer.headers["x-request-id"]
            lines = [line for line in log.splitlines() if request_id in line and " ERROR " in line]
            assert len(lines) == 1, lines  # once, with the request id
        assert "Traceback" not in log
        witness.check({200, 503})
        assert (models_copy / "ACTIVE").read_text().strip() == MODEL_A
        print(f"\nread-only models folder: {len(refused)} writes answered 503 storage_read_only, each logged once")
    finally:
        stop_server(server)


def test_a_full_disk_is_507_and_clears_when_space_is_freed(models_template: Path, tmp_path: Path) -> None:  # noqa: F811

    with small_tmpfs(tmp_path / "disk", size="4m") as disk:
        models = disk / "models"
        shutil.copytree(models_template, models)
        server = start_server(models, tmp_path)
        try:
            witness = Witness([str(disk)])
            client = witness.client(server.url)
            filler = fill(disk)
            full = [
                client.post(f"/models/{MODEL_B}/activate"),
                client.post("/train", json={"text": "Words, words, words. " * 40, "epochs": 1}),
            ]
            assert [r.status_code for r in full] == [507, 507]
            assert all(r.headers["retry-after"] for r in full)
            assert client.post("/generate", json={"prompt": "x", "max_tokens": 3}).status_code == 200
            filler.unlink()
            freed = client.post(f"/models/{MODEL_B}/activate")
            assert freed.status_code == 200, freed.text
            assert "Traceback" not in server.log()
            witness.check({200, 507})
            print("\nfull disk: activation and training 507 with Retry-After; the same activation 200 once freed")
        finally:
            stop_server(server)
