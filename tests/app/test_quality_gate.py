"""The quality gate: a job's model replaces the active one only if it is no worse on the same held-out text."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.app.conftest import CORPUS, MODEL_A, ClientFactory
from tests.app.test_train_routes import sse_events, submit, wait_until_final

pytestmark = pytest.mark.anyio

HELD_OUT = CORPUS * 3
# a fine-tune of the active model (same tokenizer, so the gate compares); 6 epochs on the corpus beat its
# random weights, and a text of one letter teaches it to predict only that letter, far worse on the corpus
LEARNS = {"text": CORPUS * 20, "base_model": MODEL_A, "epochs": 6, "lr": 0.01, "validation_text": HELD_OUT}
UNLEARNS = {"text": "e" * 6000, "base_model": MODEL_A, "epochs": 3, "lr": 0.05, "validation_text": HELD_OUT}


async def run(client: httpx.AsyncClient, **body: Any) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    response = await submit(client, **body)
    assert response.status_code == 202, response.text
    done = await wait_until_final(client, response.json()["id"], timeout=120)
    assert done["state"] == "succeeded", done["error"]
    return done, sse_events((await client.get(f"/train/{done['id']}/events")).text)


async def active(client: httpx.AsyncClient, expected: str) -> str:
    """The model /readyz names, once it is `expected` or after 5 s (a replica follows the pointer)."""
    for _ in range(50):
        model = (await client.get("/readyz")).json()["model"]
        if model == expected:
            break
        await asyncio.sleep(0.1)
    return model


async def test_a_better_model_passes_the_gate_and_becomes_active(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1)
    done, events = await run(client, name="better", **LEARNS)
    gate = done["gate"]
    assert gate["result"] == "passed", gate
    assert gate["val_loss"] <= gate["active_val_loss"]
    assert "no worse than the active model 'tiny-a'" in gate["reason"]
    assert ("gate", gate) in events
    assert done["activated"] is True and await active(client, "better") == "better"


async def test_a_worse_model_is_published_but_held_back_and_says_why(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1)
    done, events = await run(client, name="worse", **UNLEARNS)
    gate = done["gate"]
    assert gate["result"] == "held_back", gate
    assert gate["val_loss"] > gate["active_val_loss"]
    assert ("gate", gate) in events
    assert (done["model_id"], done["activated"]) == ("worse", False)
    assert "quality gate" in done["note"] and "worse than the active model 'tiny-a'" in done["note"]
    assert await active(client, "worse") == MODEL_A
    assert (await client.get("/models/worse")).status_code == 200  # published: an admin may still activate it


async def test_activate_always_skips_the_gate(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1)
    done, events = await run(client, name="forced", activate="always", **UNLEARNS)
    assert done["gate"] is None and not [kind for kind, _ in events if kind == "gate"]
    assert done["activated"] is True and await active(client, "forced") == "forced"


async def test_with_another_tokenizer_the_gate_is_skipped_and_says_so(make_client: ClientFactory) -> None:
    client = await make_client(train_threads=1)
    done, _ = await run(client, name="words", text=CORPUS * 20, tokenizer="word", epochs=1)
    assert done["gate"]["result"] == "skipped"
    assert "another tokenizer" in done["gate"]["reason"]
    assert done["activated"] is True and await active(client, "words") == "words"


async def test_activate_takes_true_false_always_or_a_canary(make_client: ClientFactory) -> None:
    client = await make_client()
    for wrong in ("sometimes", "true", 1):
        refused = await submit(client, text=CORPUS * 20, activate=wrong)
        assert refused.status_code == 422, wrong
        assert refused.json()["error"]["param"] == "activate"
        assert 'true, false, "always" or "canary:<weight>"' in refused.json()["error"]["message"]
    upload = {"file": ("corpus.txt", (CORPUS * 20).encode())}
    form = await client.post("/train", data={"epochs": "1", "activate": "false"}, files=upload)
    assert form.status_code == 202 and form.json()["params"]["activate"] is False
