"""POST/GET/DELETE /v1/files: uploads validated line by line, stored on the models volume, paged as
OpenAI pages them (in-process: no training runs here; tests/app/test_fine_tuning.py drives the SDK)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import ClientFactory
from tests.mounts import fill, read_only, small_tmpfs

pytestmark = pytest.mark.anyio

CHAT = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]})
    for i in range(3)
).encode()


async def upload(client: httpx.AsyncClient, data: bytes, name: str = "train.jsonl", **headers: str) -> httpx.Response:
    return await client.post(
        "/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, data)}, headers=headers or None
    )


def stored_files(models_dir: Path) -> list[str]:
    folder = models_dir / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def test_an_upload_is_processed_listed_read_and_deleted(client: httpx.AsyncClient, models_dir: Path) -> None:
    response = await upload(client, CHAT)
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert (file["bytes"], file["filename"], file["purpose"]) == (len(CHAT), "train.jsonl", "fine-tune")
    assert (file["status"], file["status_details"], file["format"]) == ("processed", None, "chat")

    assert (await client.get(f"/v1/files/{file['id']}")).json() == file
    content = await client.get(f"/v1/files/{file['id']}/content")
    assert content.status_code == 200 and content.content == CHAT
    listed = (await client.get("/v1/files", params={"purpose": "fine-tune"})).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [file["id"]]
    assert listed["has_more"] is False

    deleted = await client.delete(f"/v1/files/{file['id']}")
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert (await client.get(f"/v1/files/{file['id']}")).status_code == 404
    assert (await client.delete(f"/v1/files/{file['id']}")).status_code == 404
    assert stored_files(models_dir) == []


async def test_files_page_with_after_in_either_order(client: httpx.AsyncClient) -> None:
    ids = [(await upload(client, f"text {i}\n".encode(), f"{i}.txt")).json()["id"] for i in range(3)]
    first = (await client.get("/v1/files", params={"limit": 2})).json()
    assert [f["id"] for f in first["data"]] == [ids[2], ids[1]] and first["has_more"] is True
    rest = (await client.get("/v1/files", params={"limit": 2, "after": ids[1]})).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
    oldest = (await client.get("/v1/files", params={"order": "asc", "after": ids[0]})).json()
    assert [f["id"] for f in oldest["data"]] == ids[1:]
    assert (await client.get("/v1/files", params={"purpose": "batch"})).json()["data"] == []


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            CHAT + b'\n{"messages": [\n',
            "line 4: not valid JSON",
        ),
        (b'{"messages": [{"content": "a"}]}\n', 'line 1: message 1 has no "role"'),
        (b"", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', 'line 2: no "completion"'),
    ],
)
async def test_a_bad_file_is_400_naming_its_first_bad_line_and_nothing_is_stored(
    client: httpx.AsyncClient, models_dir: Path, data: bytes, words: str
) -> None:
    response = await upload(client, data)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and (error["param"], error["code"]) == ("file", "invalid_file")
    assert stored_files(models_dir) == []
    assert (await client.get("/v1/files")).json()["data"] == []


async def test_an_upload_needs_a_known_purpose_and_a_file(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("a.txt", b"text")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = await client.post("/v1/files", files={"purpose": (None, "fine-tune")})  # a form without a file
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    response = await client.post("/v1/files", json={"purpose": "fine-tune"})
    assert response.status_code == 415
    for path in ("/v1/files/file-1", "/v1/files/../../etc/passwd", "/v1/files/file-20250101120000123-abcdef/content"):
        assert (await client.get(path)).status_code == 404, path


async def test_a_file_over_its_limit_is_413_naming_the_setting(make_client: ClientFactory, models_dir: Path) -> None:
    client = await make_client(max_file_bytes=100)
    response = await upload(client, b"a" * 101)
    assert response.status_code == 413
    assert "TEXTGEN_MAX_FILE_BYTES" in response.json()["error"]["message"]
    assert (await upload(client, b"a" * 100)).status_code == 200
    response = await upload(client, b"a" * 2_000_000)  # over the body limit too: refused before it is read
    assert response.status_code == 413 and "TEXTGEN_MAX_FILE_BYTES" in response.json()["error"]["message"]


async def test_files_and_fine_tuning_jobs_need_the_admin_key(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=["user-key"], admin_keys=["admin-key"])
    user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    assert (await upload(client, b"text\n")).status_code == 401
    assert (await upload(client, b"text\n", **user)).status_code == 403
    for path in ("/v1/files", "/v1/fine_tuning/jobs"):
        assert (await client.get(path, headers=user)).status_code == 403, path
        assert (await client.get(path, headers=admin)).status_code == 200, path
    response = await client.post("/v1/fine_tuning/jobs", json={"model": "x", "training_file": "y"}, headers=user)
    assert response.status_code == 403
    assert (await upload(client, b"text\n", **admin)).status_code == 200


async def test_unknown_fine_tuning_jobs_are_404(client: httpx.AsyncClient) -> None:
    for path in ("/v1/fine_tuning/jobs/job-20250101120000123-abcdef", "/v1/fine_tuning/jobs/ftjob-abc/events"):
        response = await client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found", path
    response = await client.post("/v1/fine_tuning/jobs/job-20250101120000123-abcdef/cancel")
    assert response.status_code == 404


async def test_disk_faults_store_nothing(make_client: ClientFactory, models_dir: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", size="2m") as disk:
        models = disk / "models"
        shutil.copytree(models_dir, models)
        client = await make_client(models_dir=models)
        filler = fill(disk)
        response = await upload(client, b"text\n" * 10_000)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_storage" and "the file was not stored" in error["message"]
        assert str(disk) not in response.text
        assert stored_files(models) == []
        filler.unlink()
        assert (await upload(client, b"text\n")).status_code == 200
    with read_only(models_dir):
        client = await make_client()
        response = await upload(client, b"text\n")
        assert response.status_code == 503 and response.json()["error"]["code"] == "storage_read_only"
    assert stored_files(models_dir) == []
