"""Model aliases: the routes (compare-and-set, 404, 422, 409), resolution on the generation routes with
X-Model-Version / X-Model-Alias, the sticky weighted split, promote and abort, and two replicas
(two apps on one models folder, or on one real Redis) agreeing on every routing key."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import openai
import pytest

from app.engine import Failed, Sequence
from lm.aliases import key_fraction
from tests.app.conftest import MODEL_A, MODEL_B, MODEL_NAN, ClientFactory
from tests.app.test_routes import metric_samples
from tests.app.test_security import ADMIN_KEY, USER_KEY, bearer

pytestmark = pytest.mark.anyio

NO_AUTO_ABORT = {"canary_min_requests": 1_000_000}  # the automatic abort's TTFT check depends on timing

PRODUCTION = "production"


def sdk(client: httpx.AsyncClient, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://textgen.test/v1", api_key=key, http_client=client, max_retries=0)


async def aliases(client: httpx.AsyncClient) -> dict[str, dict]:
    listing = (await client.get("/models/aliases")).json()
    assert listing["object"] == "list"
    return {a["alias"]: a for a in listing["data"]}


async def put(client: httpx.AsyncClient, alias: str, **body: object) -> httpx.Response:
    return await client.put(f"/models/aliases/{alias}", json=body)


async def follow(client: httpx.AsyncClient) -> None:
    """What the replica's reconcile does every few seconds (and on a notice), done now."""
    await client.app.state.reconciler.reconcile()  # type: ignore[attr-defined]


async def version(client: httpx.AsyncClient, model: str, key: str) -> str:
    answer = await client.post(
        "/generate", json={"model": model, "prompt": "a", "max_tokens": 1}, headers={"X-Route-Key": key}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-alias"] == model
    return answer.headers["x-model-version"]


# ---------------------------------------------------------------------------- the routes


async def test_set_list_and_delete_an_alias_with_compare_and_set(make_client: ClientFactory, models_dir: Path) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    assert await aliases(client) == {
        PRODUCTION: {"alias": PRODUCTION, "model": MODEL_A, "canary": None, "updated_at": "", "event": None}
    }

    created = await put(client, "stable", model=MODEL_B, expected_model=None)  # null: only if it does not exist
    assert created.status_code == 200, created.text
    assert created.json()["alias"] == "stable" and created.json()["model"] == MODEL_B
    assert created.json()["canary"] is None and created.json()["updated_at"]
    assert (await aliases(client))["stable"] == created.json()

    stale = await put(client, "stable", model=MODEL_A, expected_model=MODEL_A)
    assert stale.status_code == 409 and stale.json()["error"]["type"] == "conflict_error"
    assert (await put(client, "stable", model=MODEL_A, expected_model=None)).status_code == 409
    moved = await put(
        client, "stable", model=MODEL_A, canary={"model": MODEL_B, "weight": 0.25}, expected_model=MODEL_B
    )
    assert moved.status_code == 200
    assert moved.json()["canary"] == {"model": MODEL_B, "weight": 0.25}

    # the embedded store: models/ALIASES beside models/ACTIVE, production's model being ACTIVE itself
    stored = json.loads((models_dir / "ALIASES").read_text())
    assert stored["stable"]["model"] == MODEL_A and stored["stable"]["canary"] == {"model": MODEL_B, "weight": 0.25}
    assert (models_dir / "ACTIVE").read_text().strip() == MODEL_A

    assert (await client.delete("/models/aliases/stable")).status_code == 204
    assert set(await aliases(client)) == {PRODUCTION}
    gone = await client.delete("/models/aliases/stable")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "alias_not_found"
    production = await client.delete("/models/aliases/production")
    assert production.status_code == 409 and "active model" in production.json()["error"]["message"]


async def test_bad_alias_requests_are_refused_and_change_nothing(make_client: ClientFactory) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    unknown = await put(client, "stable", model="no-such-model")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert (await put(client, "stable", model=MODEL_A, canary={"model": "nope", "weight": 0.1})).status_code == 404
    for body, param in [
        ({"model": MODEL_A, "canary": {"model": MODEL_B, "weight": 1.5}}, "canary.weight"),
        ({"model": MODEL_A, "canary": {"model": MODEL_B, "weight": "0.5"}}, "canary.weight"),  # strict types
        ({"model": MODEL_A, "canary": {"model": MODEL_A, "weight": 0.5}}, "canary.model"),
        ({}, "model"),
    ]:
        answer = await client.put("/models/aliases/stable", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["param"] == param
    bad_name = await put(client, "Not An Alias", model=MODEL_A)
    assert bad_name.status_code == 422 and bad_name.json()["error"]["param"] == "alias"
    taken = await put(client, MODEL_B, model=MODEL_A)  # a model's id: requests naming it would be ambiguous
    assert taken.status_code == 409 and taken.json()["error"]["param"] == "alias"
    assert set(await aliases(client)) == {PRODUCTION}


async def test_a_model_that_fails_validation_changes_nothing(make_client: ClientFactory) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    for alias, body in [
        ("stable", {"model": MODEL_NAN}),
        ("stable", {"model": MODEL_A, "canary": {"model": MODEL_NAN, "weight": 0.1}}),
        (PRODUCTION, {"model": MODEL_A, "canary": {"model": MODEL_NAN, "weight": 0.1}}),
        (PRODUCTION, {"model": MODEL_NAN}),
    ]:
        answer = await client.put(f"/models/aliases/{alias}", json=body)
        assert answer.status_code == 422, (alias, body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_checkpoint"
    assert await aliases(client) == {
        PRODUCTION: {"alias": PRODUCTION, "model": MODEL_A, "canary": None, "updated_at": "", "event": None}
    }
    assert (await client.get("/readyz")).json() == {"status": "ready", "model": MODEL_A}


async def test_admin_routes_need_an_admin_key(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=USER_KEY, admin_keys=ADMIN_KEY)
    user = bearer(USER_KEY)
    assert (await client.put("/models/aliases/stable", json={"model": MODEL_B}, headers=user)).status_code == 403
    assert (await client.delete("/models/aliases/stable", headers=user)).status_code == 403
    assert (await client.post("/models/aliases/production/promote", headers=user)).status_code == 403
    assert (await client.post("/models/aliases/production/abort", headers=user)).status_code == 403
    assert (await client.get("/models/aliases")).status_code == 401
    assert (await client.get("/models/aliases", headers=user)).status_code == 200
    # an inference key may use an alias whose target it could not load by naming it
    admin = bearer(ADMIN_KEY)
    assert (await client.put("/models/aliases/stable", json={"model": MODEL_B}, headers=admin)).status_code == 200
    answer = await client.post("/generate", json={"model": "stable", "prompt": "a", "max_tokens": 2}, headers=user)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == MODEL_B


async def test_activate_is_setting_production(make_client: ClientFactory, models_dir: Path) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    canary = {"model": MODEL_B, "weight": 0.5}
    assert (await put(client, PRODUCTION, model=MODEL_A, canary=canary)).status_code == 200
    assert (await client.get("/readyz")).json() == {"status": "ready", "model": MODEL_A, "canary": canary}

    assert (await client.post(f"/models/{MODEL_B}/activate")).status_code == 200  # = PUT production {"model": B}
    production = (await aliases(client))[PRODUCTION]
    assert production["model"] == MODEL_B and production["canary"] is None
    assert (await client.get("/readyz")).json() == {"status": "ready", "model": MODEL_B}

    back = await put(client, PRODUCTION, model=MODEL_A, expected_model=MODEL_B)
    assert back.status_code == 200
    assert (await client.get("/models")).json()["active"] == MODEL_A
    assert (models_dir / "ACTIVE").read_text().strip() == MODEL_A
    assert (await put(client, PRODUCTION, model=MODEL_B, expected_model=MODEL_B)).status_code == 409
    assert (await client.get("/readyz")).json()["model"] == MODEL_A


# ---------------------------------------------------------------------------- resolution and headers


async def test_an_alias_resolves_on_every_generation_route(make_client: ClientFactory) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    assert (await put(client, "stable", model=MODEL_B)).status_code == 200

    answer = await client.post("/generate", json={"model": "stable", "prompt": "To be", "max_tokens": 3})
    assert answer.status_code == 200
    assert (answer.headers["x-model-version"], answer.headers["x-model-alias"]) == (MODEL_B, "stable")
    assert answer.json()["model"] == MODEL_B
    body = {"model": "stable", "prompt": "To be", "max_tokens": 3, "stream": True}
    async with client.stream("POST", "/generate", json=body) as stream:
        assert (stream.headers["x-model-version"], stream.headers["x-model-alias"]) == (MODEL_B, "stable")
        assert "event: done" in "".join([chunk async for chunk in stream.aiter_text()])

    default = await client.post("/generate", json={"prompt": "To be", "max_tokens": 3})  # no model: production
    assert (default.headers["x-model-version"], default.headers["x-model-alias"]) == (MODEL_A, PRODUCTION)
    direct = await client.post("/generate", json={"model": MODEL_B, "prompt": "To be", "max_tokens": 3})
    assert direct.headers["x-model-version"] == MODEL_B and "x-model-alias" not in direct.headers

    api = sdk(client)
    raw = await api.completions.with_raw_response.create(model="stable", prompt="To be", max_tokens=3, user="u1")
    assert (raw.headers["x-model-version"], raw.headers["x-model-alias"]) == (MODEL_B, "stable")
    assert raw.parse().model == MODEL_B
    messages = [{"role": "user", "content": "Hi"}]
    chat = await api.chat.completions.with_raw_response.create(model="stable", messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert (chat.headers["x-model-version"], chat.headers["x-model-alias"]) == (MODEL_B, "stable")
    async with api.chat.completions.with_streaming_response.create(
        model="stable",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=3,
        stream=True,
    ) as streamed:
        assert (streamed.headers["x-model-version"], streamed.headers["x-model-alias"]) == (MODEL_B, "stable")
        assert [chunk async for chunk in await streamed.parse()]

    tokens = await client.post("/tokenize", json={"model": "stable", "text": "To be"})
    assert tokens.json()["model"] == MODEL_B
    listed = {m.id: m for m in (await api.models.list()).data}
    assert listed["stable"].model_extra == {"alias_for": MODEL_B}
    assert listed[PRODUCTION].model_extra == {"alias_for": MODEL_A}
    assert (await client.get("/v1/models/stable")).json()["alias_for"] == MODEL_B


async def test_the_split_follows_the_weight_and_each_key_sticks(make_client: ClientFactory) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    canary = {"model": MODEL_B, "weight": 0.3}
    assert (await put(client, "release", model=MODEL_A, canary=canary)).status_code == 200

    keys = [secrets.token_hex(8) for _ in range(2000)]
    served: list[str] = []
    for start in range(0, len(keys), 50):  # 50 at a time: more would wait in the admission queue
        served += await asyncio.gather(*(version(client, "release", key) for key in keys[start : start + 50]))
    share = served.count(MODEL_B) / len(served)
    assert abs(share - 0.3) <= 0.03, share
    # the version is the hash of (key, alias) against the weight: any replica computes the same
    assert served == [MODEL_B if key_fraction(key, "release") < 0.3 else MODEL_A for key in keys]

    # the key is the `user` field first, then X-Route-Key
    api = sdk(client)
    for key in keys[:20]:
        raw = await api.completions.with_raw_response.create(
            model="release", prompt="a", max_tokens=1, user=key, extra_headers={"X-Route-Key": "other"}
        )
        assert raw.headers["x-model-version"] == (MODEL_B if key_fraction(key, "release") < 0.3 else MODEL_A)


async def test_two_replicas_give_each_key_the_same_version(make_client: ClientFactory) -> None:
    one = await make_client(**NO_AUTO_ABORT)
    assert (await put(one, PRODUCTION, model=MODEL_A, canary={"model": MODEL_B, "weight": 0.5})).status_code == 200
    two = await make_client(**NO_AUTO_ABORT)  # a second replica on the same models folder
    await follow(two)
    assert (await two.get("/readyz")).json()["canary"] == {"model": MODEL_B, "weight": 0.5}
    keys = [f"user-{i}" for i in range(50)]
    for _ in range(3):
        for key in keys:
            assert await version(one, PRODUCTION, key) == await version(two, PRODUCTION, key)
    assert {await version(one, PRODUCTION, key) for key in keys} == {MODEL_A, MODEL_B}


async def test_promote_and_abort(make_client: ClientFactory, models_dir: Path) -> None:
    one = await make_client(**NO_AUTO_ABORT)
    two = await make_client(**NO_AUTO_ABORT)
    assert (await put(one, PRODUCTION, model=MODEL_A, canary={"model": MODEL_B, "weight": 0.5})).status_code == 200

    aborted = await one.post("/models/aliases/production/abort")
    assert aborted.status_code == 200 and aborted.json()["canary"] is None and aborted.json()["model"] == MODEL_A
    assert {await version(one, PRODUCTION, f"k{i}") for i in range(30)} == {MODEL_A}
    again = await one.post("/models/aliases/production/abort")
    assert again.status_code == 409 and "no canary" in again.json()["error"]["message"]

    assert (await put(one, PRODUCTION, model=MODEL_A, canary={"model": MODEL_B, "weight": 0.1})).status_code == 200
    promoted = await one.post("/models/aliases/production/promote")
    assert promoted.status_code == 200
    assert (promoted.json()["model"], promoted.json()["canary"]) == (MODEL_B, None)
    assert (await one.get("/readyz")).json() == {"status": "ready", "model": MODEL_B}
    assert (models_dir / "ACTIVE").read_text().strip() == MODEL_B
    assert {await version(one, PRODUCTION, f"k{i}") for i in range(30)} == {MODEL_B}

    await follow(two)  # the other replica swaps too
    assert (await two.get("/readyz")).json() == {"status": "ready", "model": MODEL_B}
    assert {await version(two, PRODUCTION, f"k{i}") for i in range(30)} == {MODEL_B}

    missing = await one.post("/models/aliases/nope/promote")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "alias_not_found"


async def test_alias_targets_stay_loaded(make_client: ClientFactory) -> None:
    client = await make_client(max_loaded_models=2)
    assert (await put(client, "stable", model=MODEL_B)).status_code == 200
    loaded = {m["id"]: m["loaded"] for m in (await client.get("/models")).json()["models"]}
    assert loaded[MODEL_A] and loaded[MODEL_B]
    # a third version would need room that only alias targets hold: they are not freed for it
    busy = await client.post("/generate", json={"model": MODEL_NAN, "prompt": "a", "max_tokens": 1})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "models_busy"
    assert (await client.post("/generate", json={"model": "stable", "prompt": "a", "max_tokens": 1})).status_code == 200
    deleting = await client.delete(f"/models/{MODEL_B}")
    assert deleting.status_code == 409 and "stable" in deleting.json()["error"]["message"]


# ---------------------------------------------------------------------------- Redis mode


async def test_aliases_in_redis_are_shared_by_replicas(make_client: ClientFactory, redis_mode: dict) -> None:
    one = await make_client(**redis_mode, **NO_AUTO_ABORT)
    two = await make_client(**redis_mode, **NO_AUTO_ABORT)
    assert (await put(one, "stable", model=MODEL_B, expected_model=None)).status_code == 200
    assert (await put(two, "stable", model=MODEL_A, expected_model=None)).status_code == 409  # one store
    await follow(two)
    assert await version(two, "stable", "k") == MODEL_B

    canary = {"model": MODEL_B, "weight": 0.5}
    assert (await put(two, PRODUCTION, model=MODEL_A, canary=canary)).status_code == 200
    await follow(one)
    assert (await aliases(one))[PRODUCTION]["canary"] == canary
    keys = [f"user-{i}" for i in range(50)]
    assert [await version(one, PRODUCTION, k) for k in keys] == [await version(two, PRODUCTION, k) for k in keys]

    assert (await one.post("/models/aliases/production/promote")).status_code == 200
    await follow(two)
    assert (await two.get("/readyz")).json()["model"] == MODEL_B
    assert (await two.get("/models")).json()["active"] == MODEL_B
    assert (await one.delete("/models/aliases/stable")).status_code == 204
    assert set(await aliases(two)) == {PRODUCTION}


# ---------------------------------------------------------------------------- per-version metrics, automatic abort


async def test_per_version_metrics_are_labelled_and_go_with_the_version(make_client: ClientFactory) -> None:
    client = await make_client(**NO_AUTO_ABORT)
    assert (await put(client, "stable", model=MODEL_B)).status_code == 200
    for model in ("stable", "stable", None, MODEL_B):
        body = {"prompt": "To be", "max_tokens": 3, **({"model": model} if model else {})}
        assert (await client.post("/generate", json=body)).status_code == 200
    samples = metric_samples((await client.get("/metrics")).text)

    def sample(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    requests = "textgen_version_requests_total"
    assert sample(requests, model=MODEL_B, alias="stable", outcome="ok") == 2
    assert sample(requests, model=MODEL_A, alias=PRODUCTION, outcome="ok") == 1
    assert sample(requests, model=MODEL_B, alias="", outcome="ok") == 1
    finish = "textgen_version_finish_reasons_total"
    assert sample(finish, model=MODEL_B, alias="stable", reason="length") == 2
    ttft = "textgen_version_time_to_first_token_seconds_count"
    assert sample(ttft, model=MODEL_B, alias="stable") == 2
    assert sample("textgen_version_inter_token_latency_seconds_count", model=MODEL_B, alias="stable") >= 2

    # unloaded, a version's series go: label values stay bounded by the loaded versions
    assert (await client.delete("/models/aliases/stable")).status_code == 204
    assert (await client.delete(f"/models/{MODEL_B}")).status_code == 204
    text = (await client.get("/metrics")).text
    assert f'model="{MODEL_B}"' not in text and f'model="{MODEL_A}"' in text


async def test_a_failing_canary_is_aborted_and_production_never_fails(make_client: ClientFactory) -> None:
    client = await make_client(canary_min_requests=20, canary_window=100)
    canary = {"model": MODEL_B, "weight": 0.5}
    assert (await put(client, PRODUCTION, model=MODEL_A, canary=canary)).status_code == 200
    holder = client.app.state.holder  # type: ignore[attr-defined]

    def fail(seq: Sequence) -> None:  # fault injection: every sequence of the canary's engine fails
        seq.deliver(Failed("injected fault", retryable=True))

    holder._others[MODEL_B].engine.submit = fail
    answers: dict[str, list[int]] = {MODEL_A: [], MODEL_B: []}
    while len(answers[MODEL_B]) < 20:
        key = secrets.token_hex(8)
        served = MODEL_B if key_fraction(key, PRODUCTION) < 0.5 else MODEL_A
        body = {"prompt": "To be", "max_tokens": 3}
        answers[served].append((await client.post("/generate", json=body, headers={"X-Route-Key": key})).status_code)
    await asyncio.gather(*holder.canary._tasks)  # the abort, started by the 20th canary failure

    assert set(answers[MODEL_A]) == {200}  # production traffic never failed
    assert set(answers[MODEL_B]) == {503}
    production = (await aliases(client))[PRODUCTION]
    assert production["canary"] is None
    assert production["event"] == {"kind": "canary_aborted", "reason": "failures", "canary": canary}
    after = [await version(client, PRODUCTION, secrets.token_hex(8)) for _ in range(20)]
    assert set(after) == {MODEL_A}
    samples = metric_samples((await client.get("/metrics")).text)
    aborts = ("textgen_canary_aborts_total", (("alias", PRODUCTION), ("reason", "failures")))
    assert samples[aborts] == 1
    failed = ("textgen_version_requests_total", (("alias", PRODUCTION), ("model", MODEL_B), ("outcome", "failed")))
    assert samples[failed] == 20
    assert (await put(client, PRODUCTION, model=MODEL_A)).json()["event"] is None  # any later change clears it
