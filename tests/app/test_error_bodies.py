"""Error bodies are written for the client: a broken checkpoint is named by its folder and file, an
unreachable Redis as "Redis"; the server's paths, Redis's address and the libraries' own words go to
the log only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from app.errors import ApiError, error_response
from app.settings import Settings
from tests.app.conftest import MODEL_A, MODEL_B, ClientFactory
from tests.app.test_readiness import wait_for_redis
from tests.broken_checkpoints import BREAKAGES
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio


async def test_a_corrupt_checkpoint_is_named_by_its_file_not_the_servers_path(
    make_client: ClientFactory, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (models_dir / "corrupt").mkdir()
    for f in (models_dir / MODEL_B).iterdir():
        (models_dir / "corrupt" / f.name).write_bytes(f.read_bytes())
    BREAKAGES["truncated-weights"](models_dir / "corrupt")
    client = await make_client()
    caplog.set_level(logging.WARNING)
    for answer in (
        await client.post("/generate", json={"prompt": "x", "model": "corrupt"}),
        await client.post("/v1/completions", json={"prompt": "x", "model": "corrupt"}),
        await client.post("/models/corrupt/activate"),
    ):
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["message"].endswith("corrupt/model.safetensors: truncated or corrupt")
        assert str(models_dir) not in answer.text and "SafetensorError" not in answer.text
    assert str(models_dir / "corrupt" / "model.safetensors") in caplog.text  # the operator sees where


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_an_unreachable_redis_is_named_without_its_address(
    make_client: ClientFactory, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(redis_url=own_redis.url, default_model=MODEL_A, reconcile_s=0.1)
    own_redis.stop()
    await wait_for_redis(client, '"redis":"down"')
    address = own_redis.url.removeprefix("redis://").split("/")[0]
    caplog.set_level(logging.WARNING)
    answers = [
        await client.get("/train"),
        await client.post("/train", json={"text": "to be or not to be " * 20}),
        await client.delete(f"/models/{MODEL_B}"),
        await client.post(f"/models/{MODEL_B}/activate"),
    ]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "store_unavailable" and "Redis is unreachable" in error["message"]
        assert address not in answer.text and "Error " not in answer.text and "refused" not in answer.text
    assert address in caplog.text  # in the log, for the operator


def test_a_message_that_names_a_server_path_is_redacted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(models_dir=tmp_path / "models", redis_url="redis://:secret@10.1.2.3:6390/0")
    scope = {"type": "http", "app": SimpleNamespace(state=SimpleNamespace(settings=settings))}
    leaky = ApiError(500, f"could not read {tmp_path / 'models' / 'x'} via 10.1.2.3:6390")
    body = error_response(leaky, scope).body.decode()
    assert str(tmp_path) not in body and "10.1.2.3" not in body and "secret" not in body
    assert "<server>/x" in body
    assert "redacted" in caplog.text


async def test_every_route_answers_the_error_shape_with_a_request_id(client: httpx.AsyncClient) -> None:
    for answer in (
        await client.get("/models/no-such-model"),
        await client.post("/generate", json={"prompt": "x", "model": "no-such-model"}),
        await client.get("/train/not-a-job"),
        await client.get("/no-such-route"),
    ):
        error = answer.json()["error"]
        assert answer.status_code == 404 and error["request_id"] == answer.headers["x-request-id"]


async def test_a_bug_is_a_500_with_a_generic_message_logged_once(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()

    @client.app.get("/bug")  # type: ignore[attr-defined]
    async def bug() -> None:
        raise RuntimeError(f"internal state {client.app.state.settings.models_dir}")  # type: ignore[attr-defined]

    caplog.set_level(logging.ERROR)
    answer = await client.get("/bug")
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["message"] == "the server failed to answer this request; it has been logged"
    assert error["request_id"] == answer.headers["x-request-id"]
    assert "internal state" not in answer.text
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once, with its traceback
