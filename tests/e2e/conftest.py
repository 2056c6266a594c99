"""Real processes for the end-to-end tests: `textgen serve` replicas, `textgen worker`s, a redis-server.

Every process gets one torch thread: the test machine's two cores are shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from jobs.pointer import RedisPointer
from jobs.redis_client import connect_redis
from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import ActivePointer, Registry
from lm.tokenizers import fit_tokenizer
from tests.app.conftest import wait_ready
from tests.jobs_support import FINAL_STATES, TINY, shakespeare, sse
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
TEXT = shakespeare(6_000)
BASE_MODEL = "base-v1"
# a job that trains a 16-unit LSTM on 6 KB; `epochs` sets how long it runs (about 0.2 s each)
TINY_JOB: dict[str, Any] = {"text": TEXT, **TINY}


def publish_tiny_model(
    models_dir: Path, model_id: str, pointer: ActivePointer | None = None, *, nan: bool = False
) -> None:
    """A ready-made 16-unit model (random weights); NaN weights make a checkpoint that validation refuses."""
    tokenizer = fit_tokenizer("char", TEXT)
    torch.manual_seed(0)
    model = LSTMLanguageModel(ModelConfig(tokenizer.vocab_size, embedding_dim=16, hidden_dim=16, layers=1))
    if nan:
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))
    training = {"recipe": {}, "corpus_sha256": "0" * 64, "corpus_bytes": len(TEXT)}
    Registry(models_dir, pointer).publish(model, tokenizer, model_id=model_id, training=training, metrics={})


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Cluster:
    """The processes of one test module, started and stopped together.

    As a context manager: on a failure the processes' logs are printed; everything stops at the end.
    """

    root: Path
    models_dir: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str], url: str | None = None) -> Process:
        log_path = self.root / f"{name}-{secrets.token_hex(2)}.log"
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
        process = Process(name, proc, log_path, url)
        self.processes.append(process)
        return process

    def start_api(self, name: str = "api") -> Process:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "textgen", "serve", "--host", "127.0.0.1", "--port", str(port)]
        api = self._spawn(name, [*args, "--models-dir", str(self.models_dir)], url)
        wait_ready(url, api.proc, api.log, name=name)
        return api

    def start_worker(self, name: str = "worker") -> Process:
        args = [sys.executable, "-m", "textgen", "worker", "--models-dir", str(self.models_dir), "--threads", "1"]
        return self._spawn(name, [*args, "--lease", self.env.get("TEXTGEN_JOB_LEASE_S", "3")])

    def stop_all(self) -> None:
        """Signal every process first, then wait: they shut down in parallel."""
        running = [p for p in self.processes if p.proc.poll() is None]
        for process in running:
            process.proc.send_signal(signal.SIGINT if process.url else signal.SIGTERM)
        for process in running:
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {p.name} ====\n{p.log()[-4000:]}" for p in self.processes)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is not None:
                print(self.logs())  # pytest shows a test's captured output only when it fails
        finally:
            self.stop_all()


# ---------------------------------------------------------------------------- the API, as a client


def submit(api: Process, **overrides: Any) -> dict[str, Any]:
    response = httpx.post(f"{api.url}/train", json={**TINY_JOB, **overrides}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def get_job(api: Process, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api.url}/train/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(api: Process, job_id: str, timeout: float = 90, until: tuple[str, ...] = ()) -> dict[str, Any]:
    """Poll until the job is final (or in one of `until`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(api, job_id)
        if job["state"] in (*FINAL_STATES, *until):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")


def wait_for_event(api: Process, job_id: str, kind: str, timeout: float = 60) -> dict[str, Any]:
    """Follow GET /train/{id}/events until an event of `kind` (the stream is the user's view)."""
    with httpx.stream("GET", f"{api.url}/train/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200
        for name, data in sse(response.iter_lines()):
            if name == kind:
                return data
    raise AssertionError(f"the event stream of job {job_id} ended without a {kind!r} event")


def job_events(api: Process, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a finished job, as GET /train/{id}/events replays them."""
    with httpx.stream("GET", f"{api.url}/train/{job_id}/events", timeout=30) as response:
        return list(sse(response.iter_lines()))


def serving(api: Process) -> str:
    """The model version a new request gets."""
    response = httpx.post(f"{api.url}/generate", json={"prompt": "The ", "max_tokens": 2}, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["model"])


def wait_serving(apis: list[Process], model_id: str, timeout: float = 5.0) -> float:
    """Seconds until every API serves `model_id`; fails after `timeout`."""
    started = time.monotonic()
    while any(serving(api) != model_id for api in apis):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"after {timeout}s: {[serving(api) for api in apis]}, expected {model_id}")
        time.sleep(0.05)
    return time.monotonic() - started


class SlowStream(threading.Thread):
    """A streamed generation whose client reads the first token, then nothing until `hurry` is set.

    The response stays open (unread) across whatever happens meanwhile, e.g. a model swap; then
    it is read to its end.
    """

    def __init__(self, api: Process, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.api, self.max_tokens = api, max_tokens
        self.hurry = threading.Event()
        self.started_tokens = threading.Event()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ended_at: float | None = None

    @classmethod
    def open(cls, api: Process, max_tokens: int) -> SlowStream:
        """Start one; `started_tokens` is set once its first token is read."""
        stream = cls(api, max_tokens)
        stream.start()
        return stream

    def finish(self, timeout: float = 60) -> None:
        """Let the client read on to the end, and wait for that."""
        self.hurry.set()
        self.join(timeout)

    def run(self) -> None:
        body = {"prompt": "The ", "max_tokens": self.max_tokens, "stream": True, "temperature": 1.0, "seed": 1}
        with httpx.stream("POST", f"{self.api.url}/generate", json=body, timeout=120) as response:
            for event in sse(response.iter_lines()):
                self.events.append(event)
                if not self.started_tokens.is_set():
                    self.started_tokens.set()
                    self.hurry.wait(120)
        self.ended_at = time.monotonic()


def published_for(models_dir: Path, job_id: str) -> list[str]:
    """Every model folder whose config says `job_id` published it as its model (its per-epoch checkpoints aside)."""
    trainings = {
        config.parent.name: json.loads(config.read_text())["training"] for config in models_dir.glob("*/config.json")
    }
    return sorted(name for name, t in trainings.items() if t.get("job_id") == job_id and "checkpoint_of" not in t)


def redis_pointer(redis: RedisServer) -> RedisPointer:
    """The active model's pointer in `redis`, the one the replicas and workers read and move."""
    return RedisPointer(connect_redis(redis.url))


@contextlib.contextmanager
def redis_cluster(root: Path, models_dir: Path) -> Iterator[tuple[Cluster, RedisServer]]:
    """A redis-server of its own (the tests kill and restart it) and a cluster on it serving
    BASE_MODEL; on a failure the processes' logs are printed; everything stops at the end."""
    redis = RedisServer(root / "redis")
    redis.start()
    try:
        publish_tiny_model(models_dir, BASE_MODEL)
        assert redis_pointer(redis).compare_and_set(None, BASE_MODEL)
        env = {
            "TEXTGEN_REDIS_URL": redis.url,
            "TEXTGEN_THREADS": "1",
            "TEXTGEN_RECONCILE_S": "1",
            "TEXTGEN_JOB_LEASE_S": "3",
            "TEXTGEN_MAX_TOKENS": "100000",
            "TEXTGEN_MAX_CORPUS_BYTES": "200000",
        }
        with Cluster(root, models_dir, env) as cluster:
            yield cluster, redis
    finally:
        redis.stop()
