"""Files and fine-tuning jobs driven by the official `openai` SDK against a real `textgen serve` (embedded:
the server's own local worker trains). tests/e2e/test_fine_tuning_redis.py runs the flow with Redis."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from tests.app.conftest import MODEL_A, Server, start_server, stop_server
from tests.jobs_support import FINAL_STATES, TINY, shakespeare

pytestmark = pytest.mark.slow

# the tiny job's recipe, less what OpenAI's hyperparameters set
RECIPE = {k: v for k, v in TINY.items() if k not in ("epochs", "batch_size")}


def chat_jsonl(lines: int = 60) -> bytes:
    """Conversations made of Shakespeare's lines: one line as the user's turn, the next as the reply."""
    text = [line.strip() for line in shakespeare(12_000).splitlines() if line.strip()]
    rows = []
    for i in range(lines):
        user, reply = text[(2 * i) % len(text)], text[(2 * i + 1) % len(text)]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows.append(json.dumps({"messages": messages}))
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="module")
def server(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fine-tuning")
    models = root / "models"
    shutil.copytree(models_template, models)
    srv = start_server(models, root, reconcile_s="0.2")
    yield srv
    print(srv.log()[-6000:])  # shown when a test fails
    stop_server(srv)


@pytest.fixture(scope="module")
def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def wait_final(sdk: OpenAI, job_id: str, timeout: float = 180) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in FINAL_STATES:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.2)


def upload(sdk: OpenAI, data: bytes, name: str = "train.jsonl") -> str:
    file = sdk.files.create(file=(name, data), purpose="fine-tune")
    return sdk.files.wait_for_processing(file.id, poll_interval=0.1).id


def test_fine_tuning_a_registry_model_through_the_sdk(sdk: OpenAI, server: Server) -> None:
    file = sdk.files.create(file=("chat.jsonl", chat_jsonl()), purpose="fine-tune")
    assert (file.object, file.purpose, file.status, file.filename) == ("file", "fine-tune", "processed", "chat.jsonl")
    assert sdk.files.wait_for_processing(file.id, poll_interval=0.1).status == "processed"
    assert sdk.files.content(file.id).read() == chat_jsonl()

    held_out = upload(sdk, chat_jsonl(8), "held-out.jsonl")
    key = {"Idempotency-Key": "create-1"}
    created = sdk.fine_tuning.jobs.create(
        model=MODEL_A,
        training_file=file.id,
        validation_file=held_out,
        suffix="bot",
        seed=7,
        metadata={"team": "docs"},
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"},
        extra_body=RECIPE,
        extra_headers=key,
    )
    assert created.object == "fine_tuning.job" and created.status in ("queued", "running")
    assert (created.model, created.training_file, created.validation_file) == (MODEL_A, file.id, held_out)
    assert (created.seed, created.metadata, created.user_provided_suffix) == (7, {"team": "docs"}, "bot")
    assert (created.hyperparameters.n_epochs, created.hyperparameters.batch_size) == (2, 4)
    assert created.hyperparameters.learning_rate_multiplier == 1.0 and created.fine_tuned_model is None
    retried = sdk.fine_tuning.jobs.create(model=MODEL_A, training_file=file.id, extra_body=RECIPE, extra_headers=key)
    assert retried.id == created.id  # the same job, not a second one

    done = wait_final(sdk, created.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model is not None and done.fine_tuned_model.startswith(f"{MODEL_A}-ft-bot-")
    assert done.finished_at is not None and done.trained_tokens and done.error is None
    native = httpx.get(f"{server.url}/train/{created.id}").json()  # the same job on the native route
    assert (native["state"], native["model_id"], native["activated"]) == ("succeeded", done.fine_tuned_model, False)
    assert [j["id"] for j in httpx.get(f"{server.url}/train").json()["jobs"]] == [created.id]

    answer = sdk.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Speak"}], max_tokens=5
    )
    assert answer.model == done.fine_tuned_model
    assert httpx.get(f"{server.url}/readyz").json()["model"] == MODEL_A  # not activated: not asked to

    events = list(sdk.fine_tuning.jobs.list_events(created.id, limit=3))  # paged by `after`, 3 at a time
    assert len(events) > 6 and len({e.id for e in events}) == len(events)
    assert events[0].message == "The job has successfully completed" and events[-1].message == "Job queued"
    assert all(e.object == "fine_tuning.job.event" and e.level == "info" for e in events)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(isinstance(e.data, dict) and "step" in e.data for e in metrics)
    assert any("val_loss" in e.data for e in metrics if isinstance(e.data, dict))
    first_page = sdk.fine_tuning.jobs.list_events(created.id, limit=3)
    assert [e.id for e in first_page.data] == [e.id for e in events[:3]] and first_page.has_more

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(created.id).data  # each epoch's model, newest first
    steps = [c.step_number for c in checkpoints]
    assert len(steps) == 2 and steps[0] > steps[1] > 0
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [
        f"{done.fine_tuned_model}-ckpt-step-{step}" for step in steps
    ]
    assert all(c.fine_tuning_job_id == created.id and c.metrics.valid_loss is not None for c in checkpoints)
    first_epoch = checkpoints[-1].fine_tuned_model_checkpoint
    answer = sdk.chat.completions.create(model=first_epoch, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert answer.model == first_epoch  # a checkpoint is served by its id
    assert first_epoch in {m.id for m in sdk.models.list()}
    page = sdk.fine_tuning.jobs.checkpoints.list(created.id, limit=1, after=checkpoints[0].id)
    assert [c.id for c in page.data] == [checkpoints[1].id] and not page.has_more


def test_a_recipe_trains_from_scratch_and_activate_makes_it_active(sdk: OpenAI, server: Server) -> None:
    file_id = upload(sdk, shakespeare(4_000).encode(), "plays.txt")
    job = sdk.fine_tuning.jobs.create(
        model="textgen-char", training_file=file_id, extra_body={**TINY, "activate": True, "name": "from-scratch"}
    )
    done = wait_final(sdk, job.id)
    assert done.status == "succeeded", done.error
    assert (done.model, done.fine_tuned_model) == ("textgen-char", "from-scratch")
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/readyz").json().get("model") != "from-scratch":
        assert time.monotonic() < deadline, "the service did not swap to the new model"
        time.sleep(0.1)
    httpx.post(f"{server.url}/models/{MODEL_A}/activate").raise_for_status()


def test_jobs_of_both_routes_are_listed_and_paged_and_cancelled(sdk: OpenAI, server: Server) -> None:
    native = httpx.post(f"{server.url}/train", json={"text": shakespeare(4_000), **TINY, "epochs": 10_000})
    assert native.status_code == 202, native.text
    file_id = upload(sdk, chat_jsonl(20))
    queued = sdk.fine_tuning.jobs.create(model=MODEL_A, training_file=file_id, extra_body=RECIPE)

    native_jobs = [j["id"] for j in httpx.get(f"{server.url}/train").json()["jobs"]]
    assert native_jobs[0] == queued.id and native_jobs[1] == native.json()["id"]
    listed = [j.id for j in sdk.fine_tuning.jobs.list(limit=1)]  # one a page, paged by `after`
    assert listed == native_jobs
    assert sdk.fine_tuning.jobs.retrieve(native.json()["id"]).model == "textgen-char"

    assert sdk.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    sdk.fine_tuning.jobs.cancel(native.json()["id"])  # the /train job, running or still queued
    assert wait_final(sdk, native.json()["id"], timeout=60).status == "cancelled"
    assert sdk.fine_tuning.jobs.checkpoints.list(queued.id).data == []
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(queued.id)
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.pause(queued.id)  # a job that has ended cannot be paused


def test_a_job_paused_through_the_sdk_resumes_and_finishes(sdk: OpenAI, server: Server) -> None:
    file_id = upload(sdk, shakespeare(30_000).encode(), "plays.txt")
    job = sdk.fine_tuning.jobs.create(
        model="textgen-char",
        training_file=file_id,
        hyperparameters={"n_epochs": 50},
        # long enough (several seconds) for the pause to land while it trains; each epoch ~420 steps
        extra_body={**RECIPE, "activate": False, "keep_checkpoints": 1, "max_steps": 4000},
    )
    deadline = time.monotonic() + 60
    while not any(e.type == "metrics" for e in sdk.fine_tuning.jobs.list_events(job.id, limit=50)):
        assert time.monotonic() < deadline, "the job never reported progress"
        time.sleep(0.1)
    assert sdk.fine_tuning.jobs.pause(job.id).status in ("running", "paused")  # running: it saves its state first
    deadline = time.monotonic() + 30
    while (paused := sdk.fine_tuning.jobs.retrieve(job.id)).status != "paused":
        assert paused.status == "running" and time.monotonic() < deadline, paused.status
        time.sleep(0.1)
    assert sdk.fine_tuning.jobs.pause(job.id).status == "paused"  # pausing again changes nothing

    resumed = sdk.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    done = wait_final(sdk, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert any(m.startswith("Job paused at step") for m in messages)
    assert any(m.startswith("Job resumed: it goes on from step") for m in messages)
    (kept,) = sdk.fine_tuning.jobs.checkpoints.list(job.id).data  # keep_checkpoints 1: the last epoch's alone
    models = {m.id for m in sdk.models.list()}
    assert kept.fine_tuned_model_checkpoint in models
    assert not any(
        m.startswith(f"{done.fine_tuned_model}-ckpt-") and m != kept.fine_tuned_model_checkpoint for m in models
    )
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.resume(job.id)  # only a paused job resumes


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages"\n',
            "line 2: not valid JSON",
        ),
        (b'{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}\n', 'line 1: message 2 has no "role"'),
        (b"", "the file is empty"),
        (bytes(range(256)), "not UTF-8"),
    ],
)
def test_a_bad_file_is_refused_by_the_sdk_with_its_line(sdk: OpenAI, data: bytes, words: str) -> None:
    before = [f.id for f in sdk.files.list()]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("bad.jsonl", data), purpose="fine-tune")
    assert words in str(refused.value) and refused.value.param == "file"
    assert [f.id for f in sdk.files.list()] == before


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"training_file": "file-20250101120000123-abcdef"}, "training_file"),
        ({"method": {"type": "dpo"}}, "method"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 4}, "batch_size": 8}, "batch_size"),
        ({"suffix": "Not A Suffix"}, "suffix"),
        ({"tokenizer": "bpe"}, "tokenizer"),
        ({"hidden_dim": "16"}, "hidden_dim"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"activate": "canary:2"}, "activate"),
    ],
)
def test_a_bad_create_is_400_naming_the_field(sdk: OpenAI, fields: dict[str, Any], param: str) -> None:
    file_id = upload(sdk, chat_jsonl(5))
    body = {"model": MODEL_A, "training_file": file_id, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.post("/fine_tuning/jobs", body=body, cast_to=FineTuningJob)
    assert refused.value.param == param, refused.value


def test_a_validation_file_in_another_format_is_400(sdk: OpenAI) -> None:
    training, held_out = upload(sdk, chat_jsonl(5)), upload(sdk, b"plain text\n", "held-out.txt")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.fine_tuning.jobs.create(model=MODEL_A, training_file=training, validation_file=held_out)
    assert refused.value.param == "validation_file" and "'text' data" in str(refused.value)
