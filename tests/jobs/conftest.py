"""Fixtures for the job system's tests (and the worker's, which import them): both job stores, the
Redis one on the session's real redis-server, and tiny jobs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.file_store import FileStore
from jobs.files import job_dir
from jobs.redis_client import connect_redis
from jobs.redis_store import RedisStore
from jobs.store import JobStore
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT / "data" / "shakespeare" / "shakespeare.txt"

# Hyperparameters of a job that trains a 16-unit LSTM on the 2-KB corpus in well under a second.
TINY_PARAMS: dict[str, Any] = {
    "tokenizer": "char",
    "embedding_dim": 16,
    "hidden_dim": 16,
    "layers": 1,
    "dropout": 0.0,
    "seq_len": 16,
    "batch_size": 4,
    "epochs": 2,
    "warmup_steps": 2,
    "threads": 1,
    "corpus_name": "sonnets",
    "activate": True,
}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # the test machine's cores are shared


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(4)}:"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def file_store(models_dir: Path) -> FileStore:
    return FileStore(models_dir, lease_s=1.0)


@pytest.fixture
def redis_store(redis_server: RedisServer, models_dir: Path, prefix: str) -> Iterator[RedisStore]:
    client = connect_redis(redis_server.url)
    yield RedisStore(client, models_dir, prefix=prefix, lease_s=1.0)
    client.close()


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest) -> JobStore:
    """Each contract test runs against both stores."""
    return request.getfixturevalue(f"{request.param}_store")


def tiny_params(**overrides: Any) -> dict[str, Any]:
    return {**TINY_PARAMS, "name": f"tiny-{secrets.token_hex(3)}", **overrides}


def corpus(chars: int = 4000) -> str:
    """The first few KB of the shipped Shakespeare corpus, cut at a line end."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(chars)
    return text[: text.rindex("\n") + 1]


def assert_job_files_removed(store: JobStore, job_id: str) -> None:
    """An ended job leaves no corpus, no training state and no empty folder in models/jobs/: with Redis
    nothing at all, with the file store only the record and the events (and their locks)."""
    folder = job_dir(store.models_dir, job_id)
    if isinstance(store, FileStore):
        left = {path.name for path in folder.iterdir()}
        assert left == {FileStore.RECORD, FileStore.EVENTS, ".lock", ".events.lock"}, left
    else:
        assert not folder.exists(), sorted(path.name for path in folder.iterdir())
