"""Which model versions a server loads, and who may make it: at most TEXTGEN_MAX_LOADED_MODELS run
(idle ones freed least recently used first, 503 when the rest are busy), only admin keys (or the
models TEXTGEN_LOAD_ON_DEMAND lists) load one by naming it, and GET /models tells admins which folders
cannot be read and why. Every refused activation is counted."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import MODEL_A, MODEL_B, MODEL_NAN, ClientFactory
from tests.app.test_routes import metric_samples
from tests.app.test_security import ADMIN_KEY, USER_KEY, bearer
from tests.broken_checkpoints import BREAKAGES

pytestmark = pytest.mark.anyio

MODEL_C = "tiny-c"


@pytest.fixture
def three_models(models_dir: Path) -> Path:
    shutil.copytree(models_dir / MODEL_B, models_dir / MODEL_C)
    return models_dir


async def generate(client: httpx.AsyncClient, model: str, key: str | None = None) -> httpx.Response:
    headers = bearer(key) if key else {}
    return await client.post("/generate", json={"prompt": "x", "max_tokens": 2, "model": model}, headers=headers)


async def loaded(client: httpx.AsyncClient) -> set[str]:
    return {m["id"] for m in (await client.get("/models")).json()["models"] if m["loaded"]}


async def test_an_idle_version_is_freed_least_recently_used_first(
    make_client: ClientFactory, three_models: Path
) -> None:
    client = await make_client(max_loaded_models=2)
    assert (await generate(client, MODEL_B)).status_code == 200
    assert await loaded(client) == {MODEL_A, MODEL_B}
    assert (await generate(client, MODEL_C)).status_code == 200
    assert await loaded(client) == {MODEL_A, MODEL_C}  # B was idle: freed; the active model never is


async def test_when_the_loaded_versions_are_busy_a_new_one_waits_with_503(
    make_client: ClientFactory, three_models: Path
) -> None:
    client = await make_client(max_loaded_models=2, retry_after_s=3)
    assert (await generate(client, MODEL_B)).status_code == 200
    busy = await client.app.state.holder.lease(MODEL_B)  # type: ignore[attr-defined]  # a request still on B
    try:
        refused = await generate(client, MODEL_C)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "models_busy"
        assert refused.headers["retry-after"] == "3"
        assert await loaded(client) == {MODEL_A, MODEL_B}
    finally:
        busy.release()
    assert (await generate(client, MODEL_C)).status_code == 200


async def test_only_admin_keys_load_a_model_by_naming_it(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=USER_KEY, admin_keys=ADMIN_KEY)
    refused = await generate(client, MODEL_B, USER_KEY)
    assert refused.status_code == 403, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("model_not_loaded", "model")
    assert (await generate(client, "no-such-model", USER_KEY)).status_code == 404
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL_B, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        headers=bearer(USER_KEY),
    )
    assert chat.status_code == 403
    tokenized = await client.post("/tokenize", json={"model": MODEL_B, "text": "x"}, headers=bearer(USER_KEY))
    assert tokenized.status_code == 403
    assert MODEL_B not in {
        m["id"] for m in (await client.get("/models", headers=bearer(ADMIN_KEY))).json()["models"] if m["loaded"]
    }

    assert (await generate(client, MODEL_B, ADMIN_KEY)).status_code == 200
    assert (await generate(client, MODEL_B, USER_KEY)).status_code == 200  # loaded now: any key may use it


@pytest.mark.parametrize(("allowed", "user_may_load_b"), [("*", True), (MODEL_B, True), (MODEL_A, False)])
async def test_load_on_demand_lists_what_any_key_may_load(
    make_client: ClientFactory, allowed: str, user_may_load_b: bool
) -> None:
    client = await make_client(api_keys=USER_KEY, admin_keys=ADMIN_KEY, load_on_demand=allowed)
    answer = await generate(client, MODEL_B, USER_KEY)
    assert answer.status_code == (200 if user_may_load_b else 403), answer.text


async def test_admins_see_the_folders_that_cannot_be_read_and_why(make_client: ClientFactory, models_dir: Path) -> None:
    shutil.copytree(models_dir / MODEL_B, models_dir / "half-written")
    BREAKAGES["config-not-json"](models_dir / "half-written")
    (models_dir / "Not An Id").mkdir()
    client = await make_client(api_keys=USER_KEY, admin_keys=ADMIN_KEY)

    listing = (await client.get("/models", headers=bearer(ADMIN_KEY))).json()
    reasons = {u["id"]: u["reason"] for u in listing["unreadable"]}
    assert set(reasons) == {"half-written", "Not An Id"}
    assert reasons["half-written"] == "half-written/config.json: not valid JSON"
    assert "not a model id" in reasons["Not An Id"]
    assert str(models_dir) not in str(listing)
    assert "half-written" not in {m["id"] for m in listing["models"]}

    assert (await client.get("/models", headers=bearer(USER_KEY))).json()["unreadable"] is None


async def test_every_refused_activation_is_counted(make_client: ClientFactory, models_dir: Path) -> None:
    for name, breakage in BREAKAGES.items():
        shutil.copytree(models_dir / MODEL_B, models_dir / name)
        breakage(models_dir / name)
    client = await make_client()
    refused = [MODEL_NAN, *BREAKAGES]
    for name in refused:
        answer = await client.post(f"/models/{name}/activate")
        assert answer.status_code == 422, (name, answer.text)
        assert answer.json()["error"]["code"] == "invalid_checkpoint"
        assert str(models_dir) not in answer.text
    samples = metric_samples((await client.get("/metrics")).text)
    assert samples[("textgen_model_swaps_total", (("result", "refused"),))] == len(refused) == 7
    assert (await client.get("/readyz")).json()["model"] == MODEL_A
