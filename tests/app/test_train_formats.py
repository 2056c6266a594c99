"""POST /train with chat and prompt/completion JSONL: validated line by line, trained on the answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.app.conftest import B_TEMPLATE, MODEL_B, ClientFactory
from tests.app.test_train_routes import submit, wait_until_final
from tests.corpora import CHAT_JSONL

pytestmark = pytest.mark.anyio

GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
HELD_OUT = "".join(CHAT_JSONL.splitlines(keepends=True)[32:])
TRAIN = "".join(CHAT_JSONL.splitlines(keepends=True)[:32])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{GOOD}\n{GOOD}\n" + '{"messages": [1,,]}\n', "line 3: not valid JSON (Expecting value)"),
        (f'{GOOD}\n{{"messages": [{{"content": "x"}}]}}\n', 'line 2: message 1 has no "role"'),
        (f'{GOOD}\n{{"messages": [{{"role": "robot", "content": "x"}}]}}\n', 'line 2: role "robot" is not one of'),
        (f'{GOOD}\n{{"messages": [{{"role": "user", "content": "x"}}]}}\n', "line 2: no assistant message"),
        ('{"prompt": "2+2=", "completion": " 4"}\n{"prompt": "1+1="}\n', 'line 2: no "completion"'),
    ],
)
async def test_bad_jsonl_is_refused_naming_its_first_bad_line(
    make_client: ClientFactory, models_dir: Path, text: str, message: str
) -> None:
    client = await make_client()
    inline = await submit(client, text=text)
    upload = await client.post("/train", files={"file": ("chats.jsonl", text.encode())})

    for response, param in ((inline, "text"), (upload, "file")):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["code"] == "invalid_corpus"
        assert message in error["message"]
    assert (await client.get("/train")).json() == {"jobs": []}
    assert not list((models_dir / "jobs").glob("*/corpus.txt"))  # nothing stored


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"text": TRAIN, "data_format": "completion"}, "data_format", "the corpus is 'chat' data"),
        ({"text": TRAIN, "validation_text": '{"messages": []}\n'}, "validation_text", "line 1:"),
        ({"text": TRAIN, "validation_text": "plain words\n"}, "validation_text", "'text' data"),
        ({"text": TRAIN, "validation_text": ""}, "validation_text", "empty"),
    ],
)
async def test_a_format_that_does_not_fit_is_refused(
    make_client: ClientFactory, body: dict[str, Any], param: str, words: str
) -> None:
    client = await make_client()
    response = await submit(client, **body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert (await client.get("/train")).json() == {"jobs": []}


async def test_a_chat_fine_tune_trains_on_the_answers_and_validates_on_held_out_chats(
    make_client: ClientFactory, models_dir: Path
) -> None:
    client = await make_client(train_threads=1)
    form = {"epochs": "1", "batch_size": "4", "seq_len": "16", "name": "chatty", "base_model": MODEL_B}
    form |= {"validation_text": HELD_OUT, "activate": "false"}
    response = await client.post("/train", data=form, files={"file": ("chats.jsonl", TRAIN.encode())})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["params"]["data_format"] == "chat"
    assert job["params"]["validation_bytes"] == len(HELD_OUT.encode())
    assert (models_dir / "jobs" / job["id"] / "validation.txt").read_text() == HELD_OUT

    done = await wait_until_final(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["metrics"]["val_loss"] > 0
    assert not (models_dir / "jobs" / job["id"] / "validation.txt").exists()  # freed with the corpus

    model = (await client.get("/models/chatty")).json()
    assert model["training"]["recipe"]["data_format"] == "chat"
    assert model["chat_template"] == B_TEMPLATE  # a fine-tune keeps its base model's template
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "chatty", "messages": [{"role": "user", "content": "Shall I"}], "max_tokens": 5},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "chatty"
