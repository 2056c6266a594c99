"""A release in one call: a training job with `"activate": "canary:<weight>"` makes its model production's canary
(through the quality gate); a plain activation, by a job or the CLI, is `PUT /models/aliases/production` and
clears production's canary, as `POST /models/{id}/activate` does. Embedded mode, real worker processes."""

from __future__ import annotations

import httpx
import pytest

from tests.app.conftest import MODEL_A, MODEL_B, ClientFactory
from tests.app.test_quality_gate import LEARNS, UNLEARNS, active, run
from tests.app.test_train_routes import submit

pytestmark = pytest.mark.anyio

NO_AUTO_ABORT = {"canary_min_requests": 1_000_000}  # nothing is served here: no automatic abort either
PRODUCTION = "production"


async def production(client: httpx.AsyncClient) -> dict:
    listing = (await client.get("/models/aliases")).json()
    return {a["alias"]: a for a in listing["data"]}[PRODUCTION]


async def test_activate_canary_makes_the_model_productions_canary_at_that_weight(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1, **NO_AUTO_ABORT)
    done, events = await run(client, name="candidate", activate="canary:0.25", **LEARNS)
    assert done["gate"]["result"] == "passed", done["gate"]  # the gate applies to a canary too
    assert (done["model_id"], done["activated"]) == ("candidate", False)  # a canary is not the active model
    assert "serving 25% of production's traffic as its canary" in done["note"]
    assert done["params"]["activate"] == "canary:0.25"

    alias = await production(client)
    assert alias["model"] == MODEL_A
    assert alias["canary"] == {"model": "candidate", "weight": 0.25}
    assert await active(client, MODEL_A) == MODEL_A
    canary_events = [data for kind, data in events if kind == "canary"]
    assert canary_events and canary_events[0]["canary"] == {"model": "candidate", "weight": 0.25}
    assert canary_events[0]["model"] == MODEL_A

    promoted = await client.post("/models/aliases/production/promote")
    assert promoted.status_code == 200, promoted.text
    assert (promoted.json()["model"], promoted.json()["canary"]) == ("candidate", None)
    assert await active(client, "candidate") == "candidate"


async def test_a_canary_held_back_by_the_gate_is_published_but_not_a_canary(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1, **NO_AUTO_ABORT)
    done, events = await run(client, name="worse", activate="canary:0.5", **UNLEARNS)
    assert done["gate"]["result"] == "held_back", done["gate"]
    assert (done["model_id"], done["activated"]) == ("worse", False)
    assert "not made production's canary by the quality gate" in done["note"]
    assert not [kind for kind, _ in events if kind == "canary"]
    assert (await production(client))["canary"] is None
    assert (await client.get("/models/worse")).status_code == 200


async def test_a_jobs_activation_clears_productions_canary(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1, **NO_AUTO_ABORT)
    put = await client.put(
        "/models/aliases/production", json={"model": MODEL_A, "canary": {"model": MODEL_B, "weight": 0.5}}
    )
    assert put.status_code == 200, put.text
    done, _ = await run(client, name="forced", activate="always", epochs=1, text=UNLEARNS["text"], base_model=MODEL_A)
    assert done["activated"] is True
    alias = await production(client)
    assert (alias["model"], alias["canary"]) == ("forced", None)  # = POST /models/forced/activate
    assert await active(client, "forced") == "forced"


@pytest.mark.parametrize("wrong", ["canary:0", "canary:2", "canary:x", "canary:", "canary:-0.5", "canary"])
async def test_a_canary_weight_outside_0_1_is_refused_with_a_json_error(make_client: ClientFactory, wrong: str) -> None:
    client = await make_client()
    refused = await submit(client, text="a" * 4000, activate=wrong)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "activate"
    assert "canary" in error["message"]
    assert (await client.get("/train")).json()["jobs"] == []  # nothing was queued
