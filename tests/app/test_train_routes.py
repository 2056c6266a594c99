"""The training routes through ASGI, embedded mode: what a bad submission answers, and a job's life."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import fields
from typing import Any

import httpx
import pytest

from app.train_schemas import HYPER
from lm.train import TrainConfig
from tests.app.conftest import MODEL_A, ClientFactory
from tests.jobs_support import FINAL_STATES, TINY, shakespeare, sse_events

pytestmark = pytest.mark.anyio

TEXT = shakespeare(4_000)


async def submit(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/train", json={**TINY, **body})


async def wait_until_final(client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await client.get(f"/train/{job_id}")).json()
        if job["state"] in FINAL_STATES:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"text": "   \n"}, 422, "text", "empty"),
        ({"text": "abc\x00\x01\x02" * 50}, 422, "text", "binary"),
        ({}, 422, "text", "give the corpus one way"),
        ({"text": TEXT, "corpus": "shakespeare"}, 422, "text", "give the corpus one way"),
        ({"corpus": "klingon"}, 422, "corpus", "shakespeare"),
        ({"text": TEXT[:100], "batch_size": 64}, 422, "batch_size", "shorter than one batch"),
        ({"text": TEXT, "hidden_dim": 10**6}, 422, "hidden_dim", "less than or equal to 4096"),
        ({"text": TEXT, "tokenizer": "morse"}, 422, "tokenizer", "char"),
        ({"text": TEXT, "hiden_dim": 16}, 422, "hiden_dim", "Extra inputs"),
        ({"text": TEXT, "hidden_dim": 4096, "embedding_dim": 4096, "layers": 8}, 422, "hidden_dim", "parameters"),
        ({"text": TEXT, "name": "Not An Id"}, 422, "name", "invalid model id"),
        ({"text": TEXT, "name": MODEL_A}, 409, "name", "already exists"),
        ({"text": TEXT, "base_model": "nope"}, 422, "base_model", "no model named"),
    ],
)
async def test_a_bad_submission_is_refused_and_says_why(
    make_client: ClientFactory, body: dict[str, Any], status: int, param: str, words: str
) -> None:
    client = await make_client(max_train_parameters=10_000_000)
    response = await submit(client, **body)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert (await client.get("/train")).json() == {"jobs": []}


async def test_a_corpus_over_the_limit_is_413_naming_the_setting(make_client: ClientFactory) -> None:
    client = await make_client(max_corpus_bytes=2000)

    inline = await submit(client, text=TEXT)
    upload = await client.post("/train", data={"epochs": "1"}, files={"file": ("big.txt", TEXT.encode())})

    for response in (inline, upload):
        assert response.status_code == 413
        assert "TEXTGEN_MAX_CORPUS_BYTES" in response.json()["error"]["message"]


def corpus_of(size: int) -> str:
    """`size` bytes of plain text (ASCII, so as many characters)."""
    return (TEXT * (size // len(TEXT) + 1))[:size]


async def test_a_corpus_over_the_general_body_limit_is_taken_inline_and_uploaded(
    make_client: ClientFactory, redis_mode: dict[str, Any]
) -> None:
    # Redis mode with no worker: the jobs stay queued, nothing trains on the 2 MB.
    client = await make_client(**redis_mode)  # TEXTGEN_MAX_BODY_BYTES: 1 MB, TEXTGEN_MAX_CORPUS_BYTES: 50 MB
    text = corpus_of(2_000_000)

    inline = await submit(client, text=text)
    upload = await client.post("/train", data={k: str(v) for k, v in TINY.items()}, files={"file": ("big.txt", text)})

    for response in (inline, upload):
        assert response.status_code == 202, response.text
        assert response.json()["params"]["corpus_bytes"] == 2_000_000
    # every other route keeps the general limit
    generate = await client.post("/generate", json={"prompt": corpus_of(1_000_001)})
    assert generate.status_code == 413
    assert "TEXTGEN_MAX_BODY_BYTES=1000000" in generate.json()["error"]["message"]


async def test_a_train_body_over_its_own_limit_is_413_naming_the_corpus_setting(make_client: ClientFactory) -> None:
    # /train takes bodies up to 2 x TEXTGEN_MAX_CORPUS_BYTES + 1 MB (JSON escapes, multipart framing)
    client = await make_client(max_corpus_bytes=1000)
    text = corpus_of(1_100_000)

    async def chunks():  # no Content-Length: counted as it arrives
        body = json.dumps({**TINY, "text": text}).encode()
        for start in range(0, len(body), 64_000):
            yield body[start : start + 64_000]

    declared = await submit(client, text=text)
    streamed = await client.post("/train", content=chunks(), headers={"Content-Type": "application/json"})
    upload = await client.post("/train", files={"file": ("big.txt", text)})

    for response in (declared, streamed, upload):
        assert response.status_code == 413, response.text
        assert "TEXTGEN_MAX_CORPUS_BYTES=1000" in response.json()["error"]["message"]
    assert (await client.get("/train")).json() == {"jobs": []}


@pytest.mark.parametrize(
    ("data", "words"), [(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 40, "binary"), (b"caf\xe9 " * 100, "UTF-8")]
)
async def test_an_upload_that_is_not_utf8_text_is_refused(make_client: ClientFactory, data: bytes, words: str) -> None:
    client = await make_client()
    response = await client.post("/train", files={"file": ("corpus.txt", data)})

    assert response.status_code == 422
    assert response.json()["error"]["param"] == "file" and words in response.json()["error"]["message"]


async def test_training_routes_need_the_admin_key(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=["user-key"], admin_keys=["admin-key"])

    assert (await submit(client, text=TEXT)).status_code == 401
    user = {"Authorization": "Bearer user-key"}
    assert (await client.post("/train", json={**TINY, "text": TEXT}, headers=user)).status_code == 403
    assert (await client.get("/train", headers=user)).status_code == 403
    assert (await client.get("/train", headers={"Authorization": "Bearer admin-key"})).status_code == 200


async def test_unknown_jobs_are_404(client: httpx.AsyncClient) -> None:
    for path in ("/train/job-20250101120000123-abcdef", "/train/../../etc", "/train/job-1/events"):
        response = await client.get(path)
        assert response.status_code == 404, path
    assert (await client.delete("/train/job-20250101120000123-abcdef")).status_code == 404


async def test_a_job_trains_publishes_and_the_service_swaps_to_it(make_client: ClientFactory) -> None:
    client = await make_client(reconcile_s=0.2, train_threads=1)
    response = await client.post("/train", data={**TINY, "name": "uploaded"}, files={"file": ("plays.txt", TEXT)})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/train/{job['id']}"
    assert job["state"] == "queued" and job["queue_position"] == 1 and job["params"]["name"] == "uploaded"

    done = await wait_until_final(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert (done["model_id"], done["activated"]) == ("uploaded", True)
    assert done["metrics"]["val_loss"] > 0

    events = sse_events((await client.get(f"/train/{job['id']}/events")).text)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert {"started", "progress", "epoch", "checkpoint", "published"} <= set(kinds)
    assert all(data["sample"] for kind, data in events if kind == "epoch")

    deadline = time.monotonic() + 5
    while (await client.post("/generate", json={"prompt": "The ", "max_tokens": 3})).json()["model"] != "uploaded":
        assert time.monotonic() < deadline, "the service did not swap to the new model within 5 s"
        await asyncio.sleep(0.1)
    listed = (await client.get("/train", params={"status": "succeeded"})).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]


async def test_cancelling_jobs(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1)
    running = (await submit(client, text=TEXT, epochs=1000, name="never")).json()
    queued = (await submit(client, text=TEXT)).json()
    assert queued["queue_position"] == 2

    deadline = time.monotonic() + 30
    while (await client.get(f"/train/{running['id']}")).json()["progress"] is None:
        assert time.monotonic() < deadline, "the job did not start"
        await asyncio.sleep(0.2)

    response = await client.delete(f"/train/{queued['id']}")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    response = await client.delete(f"/train/{running['id']}")
    assert response.status_code == 202 and response.json()["cancel_requested"]

    stopped = await wait_until_final(client, running["id"], timeout=15)
    assert stopped["state"] == "cancelled" and stopped["model_id"] is None
    assert (await client.get("/models/never")).status_code == 404
    assert (await client.delete(f"/train/{running['id']}")).status_code == 409
    events = sse_events((await client.get(f"/train/{running['id']}/events")).text)
    assert events[-1][0] == "cancelled"


def test_every_train_hyperparameter_is_a_post_train_field() -> None:
    assert set(HYPER) == {f.name for f in fields(TrainConfig)}
