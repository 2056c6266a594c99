"""Constrained output (structured_outputs, response_format) with the real library (llguidance) and tiny real
models of each tokenizer kind: outputs match their regex, choice or schema over many seeds; a constraint
that cannot complete within max_tokens finishes "length"; a bad one is a 400; streams give the same text."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import pytest

from lm.registry import Registry
from lm.tokenizers import fit_tokenizer
from tests.app.conftest import TRAINING, ClientFactory, _tiny_model
from tests.corpora import SONNET_18

pytestmark = pytest.mark.anyio

# the tiny models' corpus: English, JSON and the words the constraints below need, so that every kind
# (char, word, bpe) can spell them
CORPUS = (
    SONNET_18
    + '{"name": "Ann", "age": 31, "ok": true, "tags": ["a", "b"], "note": null}\n'
    + "yes no maybe - 0 1 2 3 4 5 6 7 8 9 12 42 123 to be or not\n"
)
KINDS = ("char", "word", "bpe")
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
SEEDS = range(20)


@pytest.fixture(scope="module")
def constrained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model per tokenizer kind (random weights), `tiny-char` active."""
    path = tmp_path_factory.mktemp("constrained-models")
    registry = Registry(path)
    for seed, kind in enumerate(KINDS):
        tokenizer = fit_tokenizer(kind, CORPUS, 300 if kind == "bpe" else None)
        model = _tiny_model(tokenizer.vocab_size, seed + 10)
        registry.publish(model, tokenizer, model_id=f"tiny-{kind}", training=TRAINING, metrics={"val_loss": 4.0})
    registry.activate("tiny-char")
    return path


@pytest.fixture
def models_dir(constrained_models: Path, tmp_path: Path) -> Path:
    path = tmp_path / "models"
    shutil.copytree(constrained_models, path)
    return path


async def generate(client: httpx.AsyncClient, kind: str, structured: dict, **fields: object) -> dict:
    body = {"model": f"tiny-{kind}", "prompt": "Shall I", "max_tokens": 120, "structured_outputs": structured}
    r = await client.post("/generate", json={**body, **fields})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("kind", KINDS)
async def test_outputs_match_their_regex_choice_and_schema_over_seeds(make_client: ClientFactory, kind: str) -> None:
    client = await make_client()
    validator = jsonschema_rs.validator_for(SCHEMA)
    texts: dict[str, set[str]] = {"regex": set(), "choice": set(), "json": set()}
    for seed in SEEDS:
        out = await generate(client, kind, {"regex": REGEX}, seed=seed)
        assert out["finish_reason"] == "stop" and re.fullmatch(REGEX, out["text"]), out
        texts["regex"].add(out["text"])
        out = await generate(client, kind, {"choice": CHOICES}, seed=seed)
        assert out["finish_reason"] == "stop" and out["text"] in CHOICES, out
        texts["choice"].add(out["text"])
        out = await generate(client, kind, {"json": SCHEMA}, seed=seed, temperature=0.8)
        assert out["finish_reason"] == "stop", out
        assert validator.is_valid(json.loads(out["text"])), out
        texts["json"].add(out["text"])
    assert all(len(seen) > 1 for seen in texts.values()), texts  # sampled, not one forced string


@pytest.mark.parametrize("kind", KINDS)
async def test_greedy_output_matches_too(make_client: ClientFactory, kind: str) -> None:
    client = await make_client()
    out = await generate(client, kind, {"json": SCHEMA}, temperature=0)
    assert out["finish_reason"] == "stop" and jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(out["text"]))
    again = await generate(client, kind, {"json": SCHEMA}, temperature=0)
    assert again["text"] == out["text"]


async def test_a_constraint_that_cannot_complete_within_max_tokens_finishes_length(client: httpx.AsyncClient) -> None:
    for seed in range(5):
        out = await generate(client, "char", {"regex": "[a-z]{50}"}, max_tokens=7, seed=seed)
        assert out["finish_reason"] == "length"
        assert re.fullmatch("[a-z]{7}", out["text"]), out  # the valid prefix
        assert out["usage"]["completion_tokens"] == 7


async def test_a_schema_that_cannot_complete_within_max_tokens_gives_a_valid_prefix(client: httpx.AsyncClient) -> None:
    out = await generate(client, "char", {"json": SCHEMA}, max_tokens=10, seed=3)
    assert out["finish_reason"] == "length"
    assert out["text"].startswith('{"') and len(out["text"]) == 10  # properties come in any order


async def test_the_model_decides_where_an_open_ended_regex_ends(client: httpx.AsyncClient) -> None:
    """[0-9]+ accepts after one digit: the sequence ends with "stop" where the model leaves the grammar."""
    finishes = set()
    for seed in SEEDS:
        out = await generate(client, "char", {"regex": "[0-9]+"}, max_tokens=60, seed=seed)
        assert re.fullmatch("[0-9]+", out["text"]), out
        finishes.add(out["finish_reason"])
        if out["finish_reason"] == "stop":
            assert out["usage"]["completion_tokens"] == len(out["text"])  # the ending token is not counted
    assert "stop" in finishes


@pytest.mark.parametrize(
    ("structured", "says"),
    [
        ({"regex": "[0-9"}, "unclosed character class"),
        ({"json": {"type": "object", "not": {"type": "object"}}}, "not"),
        ({"json": {"type": "wibble"}}, "wibble"),
        ({"json": "{not json"}, "not JSON"),
        ({"grammar": "start: missing_rule"}, "missing_rule"),
        ({"regex": "[日本]+"}, "cannot spell"),
        ({"regex": "a", "choice": ["b"]}, "exactly one"),
        ({}, "exactly one"),
    ],
)
async def test_a_bad_constraint_is_a_400_with_the_library_message(
    client: httpx.AsyncClient, structured: dict, says: str
) -> None:
    for path, body in [
        ("/generate", {"prompt": "x", "structured_outputs": structured}),
        ("/v1/completions", {"prompt": "x", "structured_outputs": structured}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "structured_outputs": structured}),
    ]:
        r = await client.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert says in error["message"] and error["param"].startswith("structured_outputs"), error
        assert "/work" not in r.text and "site-packages" not in r.text


async def test_json_schema_the_vocabulary_cannot_spell_is_a_400(make_client: ClientFactory, tmp_path: Path) -> None:
    """The default test models' corpus has no "{": a JSON object cannot even start."""
    client = await make_client()
    registry = Registry(client.app.state.settings.models_dir)  # type: ignore[attr-defined]
    tokenizer = fit_tokenizer("char", "plain words only, no braces\n")
    registry.publish(_tiny_model(tokenizer.vocab_size, 5), tokenizer, model_id="plain", training=TRAINING, metrics={})
    body = {
        "model": "plain",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"},
    }
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert "cannot spell" in r.json()["error"]["message"]


async def test_response_format_and_structured_outputs_together_are_a_400(client: httpx.AsyncClient) -> None:
    body = {
        "prompt": "x",
        "response_format": {"type": "json_object"},
        "structured_outputs": {"regex": "a"},
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]
    body["response_format"] = {"type": "text"}  # no constraint: structured_outputs alone
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a"


async def stream_text(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, list[str]]:
    text, finishes = [], []
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if path == "/generate":
                if event == "token":
                    text.append(data["text"])
                elif event == "done":
                    finishes.append(data["finish_reason"])
            else:
                for choice in data["choices"]:
                    text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                    if choice["finish_reason"]:
                        finishes.append(choice["finish_reason"])
    return "".join(text), finishes


@pytest.mark.parametrize("kind", KINDS)
async def test_streaming_and_non_streaming_give_the_same_text_under_a_seed(
    make_client: ClientFactory, kind: str
) -> None:
    client = await make_client()
    for seed in range(4):
        body = {"model": f"tiny-{kind}", "prompt": "Shall I", "max_tokens": 120, "seed": seed}
        body["structured_outputs"] = {"json": SCHEMA}
        whole = (await client.post("/generate", json=body)).json()
        streamed, finishes = await stream_text(client, "/generate", body)
        assert streamed == whole["text"] and finishes == [whole["finish_reason"]]
        chat = {"model": f"tiny-{kind}", "messages": [{"role": "user", "content": "hi"}], "seed": seed, "n": 2}
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        chat["max_tokens"] = 120
        whole = (await client.post("/v1/chat/completions", json=chat)).json()
        streamed, finishes = await stream_text(client, "/v1/chat/completions", {**chat, "n": 1})
        assert streamed == whole["choices"][0]["message"]["content"]
        assert whole["choices"][0]["message"]["content"] != whole["choices"][1]["message"]["content"] or seed


async def test_stop_strings_still_cut_a_constrained_text(client: httpx.AsyncClient) -> None:
    out = await generate(client, "char", {"regex": "abc-[0-9]{2}"}, stop=["-"], seed=1)
    assert out == {**out, "text": "abc", "finish_reason": "stop"}


@pytest.fixture
async def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://textgen.test/v1", api_key="unused", http_client=client, max_retries=0)


async def test_the_openai_sdk_drives_response_format_and_structured_outputs(sdk: openai.AsyncOpenAI) -> None:
    validator = jsonschema_rs.validator_for(SCHEMA)
    chat = await sdk.chat.completions.create(
        model="tiny-bpe",
        messages=[{"role": "user", "content": "Who?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
        max_tokens=120,
        seed=4,
    )
    content = chat.choices[0].message.content or ""
    assert chat.choices[0].finish_reason == "stop" and validator.is_valid(json.loads(content))
    chat = await sdk.chat.completions.create(
        model="tiny-word",
        messages=[{"role": "user", "content": "Who?"}],
        response_format={"type": "json_object"},
        max_tokens=200,
        seed=4,
    )
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)
    completion = await sdk.completions.create(
        model="tiny-char",
        prompt="Answer:",
        max_tokens=10,
        seed=1,
        extra_body={"structured_outputs": {"choice": CHOICES}},
    )
    assert completion.choices[0].text in CHOICES and completion.choices[0].finish_reason == "stop"
    completion = await sdk.completions.create(
        model="tiny-word", prompt="Answer:", max_tokens=10, n=3, extra_body={"structured_outputs": {"regex": REGEX}}
    )
    assert all(re.fullmatch(REGEX, c.text) for c in completion.choices)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.completions.create(model="tiny-char", prompt="x", extra_body={"structured_outputs": {"regex": "("}})
    assert "unclosed group" in str(caught.value)


async def test_a_grammar_constrains_too(client: httpx.AsyncClient) -> None:
    lark = 'start: "to " WORD\nWORD: /(be|or|not)/'
    gbnf = 'root ::= "to " ("be" | "or" | "not")'
    for grammar in (lark, gbnf):
        for seed in range(5):
            out = await generate(client, "char", {"grammar": grammar}, seed=seed)
            assert out["finish_reason"] == "stop" and out["text"] in ("to be", "to or", "to not"), out


async def test_compiled_constraints_are_cached_per_model_with_a_bound(client: httpx.AsyncClient) -> None:
    holder = client.app.state.holder  # type: ignore[attr-defined]
    for seed in range(3):
        await generate(client, "char", {"json": SCHEMA}, seed=seed)
    lease = await holder.lease("tiny-char")
    try:
        assert len(lease.loaded.constraints) == 1
        assert lease.loaded.constraints.cache_size > 0
    finally:
        lease.release()
