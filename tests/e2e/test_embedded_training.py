"""Embedded mode end to end: one `textgen serve` process, no Redis; it runs jobs in a local worker."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from lm.registry import FilePointer
from tests.e2e.conftest import (
    BASE_MODEL,
    Cluster,
    SlowStream,
    job_events,
    publish_tiny_model,
    serving,
    submit,
    wait_for_job,
    wait_serving,
)

pytestmark = pytest.mark.slow


def test_train_then_swap_and_a_restart_still_lists_the_job(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    publish_tiny_model(models_dir, BASE_MODEL)
    assert FilePointer(models_dir).compare_and_set(None, BASE_MODEL)
    env = {"TEXTGEN_THREADS": "1", "TEXTGEN_TRAIN_THREADS": "1", "TEXTGEN_RECONCILE_S": "0.5"}
    with Cluster(tmp_path, models_dir, {**env, "TEXTGEN_MAX_TOKENS": "100000"}) as cluster:
        api = cluster.start_api("embedded")
        assert serving(api) == BASE_MODEL
        stream = SlowStream.open(api, max_tokens=5000)
        assert stream.started_tokens.wait(30)

        job = submit(api, name="embedded-v2")
        done = wait_for_job(api, job["id"])
        assert done["state"] == "succeeded", done["error"]
        wait_serving([api], "embedded-v2", timeout=5.0)
        assert stream.ended_at is None  # the stream is still open on the old version
        stream.finish()
        last_kind, last = stream.events[-1]
        assert last_kind == "done" and last["model"] == BASE_MODEL  # finished on the version it started on

        kinds = [kind for kind, _ in job_events(api, job["id"])]
        assert kinds[0] == "queued" and kinds[-1] == "done" and "epoch" in kinds

        assert api.stop(signal.SIGINT) == 0
        api = cluster.start_api("embedded-again")
        listed = httpx.get(f"{api.url}/train", timeout=10).json()["jobs"]
        assert [(j["id"], j["state"], j["model_id"]) for j in listed] == [(job["id"], "succeeded", "embedded-v2")]
        assert serving(api) == "embedded-v2"
