"""The server's disk at fault: a read-only models folder, a full one. The answers are 503 and 507 with a
code, never 500; each failure is logged once; nothing is half-written; generation goes on."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tests.app.conftest import MODEL_A, MODEL_B, ClientFactory
from tests.corpora import HAMLET
from tests.mounts import fill, read_only, small_tmpfs

pytestmark = pytest.mark.anyio

JOB = {"text": HAMLET * 3, "epochs": 1, "hidden_dim": 16, "embedding_dim": 8, "batch_size": 4, "seq_len": 16}


def storage_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_read_only_models_folder_answers_503_and_changes_nothing(
    make_client: ClientFactory, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with read_only(models_dir):
        client = await make_client()
        caplog.clear()
        attempts = {
            "train": await client.post("/train", json=JOB),
            "upload": await client.post("/train", files={"file": ("play.txt", (HAMLET * 3).encode())}),
            "activate": await client.post(f"/models/{MODEL_B}/activate"),
            "delete": await client.delete(f"/models/{MODEL_B}"),
        }
        for name, answer in attempts.items():
            assert answer.status_code == 503, (name, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "storage_read_only", name
            assert error["type"] == "service_unavailable"
            assert "read-only" in error["message"] and str(models_dir) not in answer.text
            assert error["request_id"] == answer.headers["x-request-id"]
        assert len(storage_errors(caplog)) == len(attempts)  # once each, and without a traceback
        assert all(r.exc_info is None for r in storage_errors(caplog))

        generated = await client.post("/generate", json={"prompt": "x", "max_tokens": 3})
        assert generated.status_code == 200 and generated.headers["x-model-version"] == MODEL_A
        assert (await client.get("/train")).json()["jobs"] == []
    assert (models_dir / "ACTIVE").read_text().strip() == MODEL_A
    assert (models_dir / MODEL_B).is_dir()
    assert not (models_dir / "jobs").exists() or not any((models_dir / "jobs").iterdir())


async def test_a_full_disk_answers_507_until_space_is_freed(
    make_client: ClientFactory, models_dir: Path, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "disk", size="2m") as disk:
        models = disk / "models"
        shutil.copytree(models_dir, models)
        client = await make_client(models_dir=models)
        filler = fill(disk)

        for answer in (await client.post(f"/models/{MODEL_B}/activate"), await client.post("/train", json=JOB)):
            assert answer.status_code == 507, answer.text
            error = answer.json()["error"]
            assert error["code"] == "insufficient_storage" and error["type"] == "insufficient_storage"
            assert answer.headers["retry-after"] == "60"
            assert str(disk) not in answer.text
        assert (models / "ACTIVE").read_text().strip() == MODEL_A
        assert (await client.get("/readyz")).json()["model"] == MODEL_A
        assert not any(p.name.startswith("ACTIVE.") for p in models.iterdir())  # no temporary file left

        filler.unlink()
        answer = await client.post(f"/models/{MODEL_B}/activate")
        assert answer.status_code == 200, answer.text
        assert (models / "ACTIVE").read_text().strip() == MODEL_B
