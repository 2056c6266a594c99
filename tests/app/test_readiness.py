"""/readyz in Redis mode: it says whether Redis answers (within a second of a change), stays 200 while a
model serves without it, and never shows the Redis URL's password (nor do the logs)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import MODEL_A, MODEL_B, ClientFactory
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio


async def wait_for_redis(client: httpx.AsyncClient, state: str, timeout: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        ready = await client.get("/readyz")
        if state in ready.text:
            return ready
        assert time.monotonic() < deadline, f"/readyz never said Redis is {state}: {ready.text}"
        await asyncio.sleep(0.1)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password=secrets.token_hex(12))
    server.start()
    yield server
    server.stop()


async def test_readyz_says_redis_is_down_and_up_again_and_never_shows_the_password(
    make_client: ClientFactory, redis_with_password: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = redis_with_password
    client = await make_client(redis_url=server.url, default_model=MODEL_A, reconcile_s=0.1)

    up = await client.get("/readyz")
    assert (up.status_code, up.json()) == (200, {"status": "ready", "model": MODEL_A, "redis": "up"})

    server.stop()
    down = await wait_for_redis(client, '"redis":"down"')
    assert (down.status_code, down.json()) == (200, {"status": "ready", "model": MODEL_A, "redis": "down"})
    generated = await client.post("/generate", json={"prompt": "To be", "max_tokens": 3})
    assert generated.status_code == 200  # the loaded model serves without Redis
    jobs = await client.get("/train")
    assert jobs.status_code == 503 and "Retry-After" in jobs.headers
    # Registry changes need the pointer: neither acts on a stale answer while Redis is away.
    deleted = await client.delete(f"/models/{MODEL_B}")
    assert deleted.status_code == 503 and "Retry-After" in deleted.headers
    activated = await client.post(f"/models/{MODEL_B}/activate")
    assert activated.status_code == 503

    server.start()
    again = await wait_for_redis(client, '"redis":"up"')
    assert again.status_code == 200
    assert (await client.get("/train")).status_code == 200

    bodies = [up.text, down.text, jobs.text, again.text]
    assert server.password is not None
    assert not [text for text in [*bodies, caplog.text] if server.password in text]
    assert "Redis is down" in caplog.text  # the outage was logged (without the URL's secret)


@pytest.mark.parametrize("fault", ["killed", "hung"])
async def test_readyz_sees_redis_down_within_a_second(
    make_client: ClientFactory, redis_with_password: RedisServer, fault: str
) -> None:
    """A probe answers from the last PING, and PINGs come often and time out fast: neither a dead Redis
    (connection refused) nor a hung one (SIGSTOP: no answer at all) reads "up" for a second."""
    server = redis_with_password
    client = await make_client(redis_url=server.url, default_model=MODEL_A, reconcile_s=30.0)
    assert (await client.get("/readyz")).json()["redis"] == "up"
    assert server.proc is not None
    pid = server.proc.pid

    os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        down = await wait_for_redis(client, '"redis":"down"', timeout=10.0)
        seen_after = time.monotonic() - stopped
    finally:
        if fault == "hung":
            os.kill(pid, signal.SIGCONT)
    assert (down.status_code, down.json()) == (200, {"status": "ready", "model": MODEL_A, "redis": "down"})
    assert seen_after < 1.0, f"/readyz said Redis was up {seen_after:.2f}s after it was {fault}"


async def test_not_ready_says_redis_is_down_too(
    make_client: ClientFactory, redis_with_password: RedisServer, tmp_path: Path
) -> None:
    empty = tmp_path / "no-models"
    client = await make_client(models_dir=empty, redis_url=redis_with_password.url, reconcile_s=0.1)
    assert (await client.get("/readyz")).status_code == 503

    redis_with_password.stop()
    down = await wait_for_redis(client, "Redis is down")
    assert down.status_code == 503
    assert down.json()["error"]["message"].startswith("not ready: no active model")


async def test_readyz_has_no_redis_field_in_embedded_mode(client: httpx.AsyncClient) -> None:
    assert (await client.get("/readyz")).json() == {"status": "ready", "model": MODEL_A}
