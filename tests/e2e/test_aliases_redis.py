"""Aliases end to end: a real redis-server and two real `textgen serve` replicas agree on every routing
key's version, split traffic by the canary's weight, and promote and abort under running streams."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.conftest import (
    BASE_MODEL,
    Cluster,
    Process,
    SlowStream,
    publish_tiny_model,
    redis_cluster,
    wait_serving,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CANARY = "canary-v2"


@dataclass
class Replicas:
    cluster: Cluster
    one: Process
    two: Process

    def client(self, api: Process) -> httpx.Client:
        return httpx.Client(base_url=str(api.url), timeout=30)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("aliases-e2e")
    with redis_cluster(root, root / "models") as (cluster, _redis):
        publish_tiny_model(cluster.models_dir, CANARY)
        cluster.env["TEXTGEN_CANARY_MIN_REQUESTS"] = "1000000"  # no automatic abort: its TTFT check is timing
        yield Replicas(cluster, cluster.start_api("api-1"), cluster.start_api("api-2"))


@pytest.fixture(autouse=True)
def _logs_on_failure(replicas: Replicas) -> Iterator[None]:
    yield
    print(replicas.cluster.logs())  # pytest shows a test's captured output only when it fails


def canary_seen(api: Process, expected: dict | None, timeout: float = 10.0) -> None:
    """Wait until the replica's /readyz shows `expected` as production's canary (it follows the notice)."""
    deadline = time.monotonic() + timeout
    while (seen := httpx.get(f"{api.url}/readyz", timeout=5).json().get("canary")) != expected:
        assert time.monotonic() < deadline, f"{api.name} shows canary {seen}, not {expected}"
        time.sleep(0.05)


def version(client: httpx.Client, key: str) -> str:
    body = {"model": "production", "prompt": "a", "max_tokens": 1}
    answer = client.post("/generate", json=body, headers={"X-Route-Key": key})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-alias"] == "production"
    return answer.headers["x-model-version"]


def test_the_split_holds_across_two_replicas(replicas: Replicas) -> None:
    one, two = replicas.client(replicas.one), replicas.client(replicas.two)
    canary = {"model": CANARY, "weight": 0.2}
    body = {"model": BASE_MODEL, "canary": canary, "expected_model": BASE_MODEL}
    answer = one.put("/models/aliases/production", json=body)
    assert answer.status_code == 200, answer.text
    canary_seen(replicas.two, canary)  # the other replica follows the aliases notice

    served = [version((one, two)[i % 2], secrets.token_hex(8)) for i in range(2000)]  # alternately
    share = served.count(CANARY) / len(served)
    assert abs(share - 0.2) <= 0.03, share

    keys = [f"user-{i}" for i in range(50)]
    for _ in range(3):
        assert [version(one, k) for k in keys] == [version(two, k) for k in keys]
    assert {version(one, k) for k in keys} == {BASE_MODEL, CANARY}


def test_promote_then_abort_under_32_streams(replicas: Replicas) -> None:
    one, two = replicas.client(replicas.one), replicas.client(replicas.two)
    canary = {"model": CANARY, "weight": 0.5}
    assert one.put("/models/aliases/production", json={"model": BASE_MODEL, "canary": canary}).status_code == 200
    canary_seen(replicas.two, canary)
    streams = [SlowStream.open((replicas.one, replicas.two)[i % 2], max_tokens=200) for i in range(32)]
    for stream in streams:
        assert stream.started_tokens.wait(60)

    promoted = two.post("/models/aliases/production/promote")
    assert promoted.status_code == 200, promoted.text
    wait_serving([replicas.one, replicas.two], CANARY, timeout=10)
    canary_seen(replicas.one, None)
    back = {"model": CANARY, "canary": {"model": BASE_MODEL, "weight": 0.5}}
    assert one.put("/models/aliases/production", json=back).status_code == 200
    canary_seen(replicas.two, back["canary"])
    aborted = one.post("/models/aliases/production/abort")
    assert aborted.status_code == 200 and aborted.json()["canary"] is None
    canary_seen(replicas.two, None)

    for stream in streams:
        stream.finish()
        kinds = [kind for kind, _ in stream.events]
        assert "error" not in kinds and kinds[-1] == "done", kinds[-3:]
        done = stream.events[-1][1]
        assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 200
    assert {version(one, f"k{i}") for i in range(20)} == {version(two, f"k{i}") for i in range(20)} == {CANARY}
