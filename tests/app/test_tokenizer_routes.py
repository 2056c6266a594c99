"""POST /tokenize (textgen's shape and vLLM's), POST /detokenize and GET /tokenizer_info, as remote-tokenizer
clients (lm-evaluation-harness's `tokenizer_backend=remote`) call them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from jinja2 import BaseLoader, Environment, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.chat import jinja_chat_template, render_chat
from app.schemas import ChatMessage
from lm.checkpoint import DEFAULT_CHAT_TEMPLATE
from tests.app.conftest import B_TEMPLATE, MODEL_A, MODEL_B, ClientFactory

pytestmark = pytest.mark.anyio

# what the harness renders the template with (lm_eval.utils.env), and what Hugging Face's apply_chat_template does
HARNESS_JINJA = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
HF_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not?"}],
    [
        {"role": "developer", "content": "Rhyme."},
        {"role": "user", "content": [{"type": "text", "text": "Shall I "}, {"type": "text", "text": "compare"}]},
        {"role": "assistant", "content": "thee"},
        {"role": "user", "content": '  {{ not a tag }} {% neither %}\n\tand "quotes" \\ 猫 🙂\r\n'},
    ],
    [{"role": "assistant", "content": None}, {"role": "user", "content": ""}],
    [{"role": "assistant"}],  # no content at all
]
ODD_TEMPLATE = {
    "system": 'Sys "quoted" \\ ',
    "user": "\n\n### 用户 🙂\t",
    "assistant": "\r\n>>> {{ x }} {% y %} ",
    "separator": "\u2028\n",
    "stop": ["\n###"],
}


def _server_render(template: dict[str, Any] | None, messages: list[dict[str, Any]], generation: bool) -> str:
    parsed = [ChatMessage.model_validate(m) for m in messages]
    return render_chat(template, parsed, add_generation_prompt=generation)[0]


@pytest.mark.parametrize("template", [None, B_TEMPLATE, ODD_TEMPLATE], ids=["default", "model-b", "odd"])
@pytest.mark.parametrize("env", [HARNESS_JINJA, HF_JINJA], ids=["harness", "hugging-face"])
def test_the_jinja_template_renders_as_the_server_does(template: dict[str, Any] | None, env: Environment) -> None:
    jinja = env.from_string(jinja_chat_template(template))
    for messages in CONVERSATIONS:
        assert jinja.render(messages=messages, add_generation_prompt=True) == _server_render(template, messages, True)
        assert jinja.render(messages=messages, add_generation_prompt=False) == _server_render(template, messages, False)
        assert jinja.render(messages=messages) == _server_render(template, messages, False)  # HF's default


async def test_tokenizer_info_gives_the_tokens_and_a_template_that_renders_like_the_chat_route(
    make_client: ClientFactory,
) -> None:
    client = await make_client(max_prompt_chars=300)
    info = (await client.get("/tokenizer_info")).json()
    assert info["model"] == MODEL_A
    assert info["tokenizer_class"] == "CharTokenizer" and info["kind"] == "char"
    assert info["bos_token"] == "\n"  # what a generation from an empty prompt starts from
    assert info["eos_token"] is None and info["pad_token"] is None and info["unk_token"] == "<unk>"
    assert info["model_max_length"] == 300  # one character per token: the prompt cap, in tokens
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = HARNESS_JINJA.from_string(info["chat_template"]).render(messages=chat, add_generation_prompt=True)
    assert rendered == _server_render(DEFAULT_CHAT_TEMPLATE, chat, True) == "System: Be brief.\nUser: Hi\nAssistant: "
    tokenized = (await client.post("/tokenize", json={"messages": chat})).json()
    assert tokenized["tokens"] == (await client.post("/tokenize", json={"text": rendered})).json()["ids"]
    other = (await client.get("/tokenizer_info", params={"model": MODEL_B})).json()
    assert other["model"] == MODEL_B
    assert HARNESS_JINJA.from_string(other["chat_template"]).render(messages=chat, add_generation_prompt=True) == (
        "S: Be brief.\nQ: Hi\nA: "
    )
    missing = await client.get("/tokenizer_info", params={"model": "no-such-model"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


async def test_tokenize_keeps_textgens_shape_and_answers_vllms(client: httpx.AsyncClient) -> None:
    ours = await client.post("/tokenize", json={"text": "To be"})
    assert ours.status_code == 200
    assert ours.json() == {"model": MODEL_A, "ids": ours.json()["ids"], "tokens": list("To be"), "count": 5}
    vllm = await client.post("/tokenize", json={"prompt": "To be", "add_special_tokens": False})
    assert vllm.status_code == 200
    assert vllm.json() == {"tokens": ours.json()["ids"], "count": 5, "max_model_len": 16_384, "token_strs": None}
    with_strs = (await client.post("/tokenize", json={"prompt": "To be", "return_token_strs": True})).json()
    assert with_strs["tokens"] == ours.json()["ids"] and with_strs["token_strs"] == list("To be")
    chat = [{"role": "user", "content": "Hi"}]
    turn = (await client.post("/tokenize", json={"model": MODEL_B, "messages": chat})).json()
    assert turn["tokens"] == (await client.post("/tokenize", json={"text": "Q: Hi\nA: "})).json()["ids"]
    no_prefix = {"model": MODEL_B, "messages": chat, "add_generation_prompt": False}
    assert (await client.post("/tokenize", json=no_prefix)).json()["count"] == len("Q: Hi\n")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "text"),
        ({"text": "a", "prompt": "a"}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
        ({"messages": []}, "messages"),
        ({"prompt": "a", "model": "no-such-model"}, "model"),
    ],
)
async def test_a_bad_tokenize_request_names_its_field(client: httpx.AsyncClient, body: dict, param: str) -> None:
    response = await client.post("/tokenize", json=body)
    assert response.status_code in (404, 422)
    assert response.json()["error"]["param"] == param


async def test_the_prompt_cap_applies_to_vllms_shape(make_client: ClientFactory) -> None:
    client = await make_client(max_prompt_chars=10)
    assert (await client.post("/tokenize", json={"prompt": "x" * 10})).status_code == 200
    too_long = await client.post("/tokenize", json={"prompt": "x" * 11})
    assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "prompt"
    chat = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "x" * 5}]})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "messages"  # "User: xxxxx\nAssistant: "


async def test_detokenize_gives_the_text_of_ids(client: httpx.AsyncClient) -> None:
    ids = (await client.post("/tokenize", json={"prompt": "Shall I compare"})).json()["tokens"]
    answer = await client.post("/detokenize", json={"tokens": ids})
    assert answer.status_code == 200 and answer.json() == {"prompt": "Shall I compare"}
    assert (await client.post("/detokenize", json={"tokens": [0], "model": MODEL_B})).json() == {"prompt": "\ufffd"}
    assert (await client.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}
    info = (await client.get("/tokenizer_info")).json()
    for bad in (info["vocab_size"], -1, 10**12):
        refused = await client.post("/detokenize", json={"tokens": [ids[0], bad]})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["param"] == "tokens" and f"tokens.1 is {bad}, outside the vocabulary" in error["message"]
    not_ints = await client.post("/detokenize", json={"tokens": [1, 2.5]})
    assert not_ints.status_code == 422 and not_ints.json()["error"]["param"] == "tokens.1"
    missing = await client.post("/detokenize", json={"tokens": [1], "model": "no-such-model"})
    assert missing.status_code == 404


async def test_the_harness_remote_tokenizer_calls(client: httpx.AsyncClient) -> None:
    """Exactly what lm_eval.utils.RemoteTokenizer sends and reads: tokenizer_info without a model (its
    `eos_token` key must be there), tokenize {"prompt", "add_special_tokens": false} -> tokens,
    detokenize {"tokens"} -> prompt, and the prefix token as `encode(bos_token)[0] or eos id`."""
    info = (await client.get("/tokenizer_info")).json()
    assert "eos_token" in info
    probe = (await client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False})).json()
    assert isinstance(probe["tokens"], list) and probe["count"] == 4
    bos = (await client.post("/tokenize", json={"prompt": info["bos_token"], "add_special_tokens": False})).json()
    (prefix,) = bos["tokens"]
    assert prefix  # truthy: the harness takes `bos_token_id or eos_token_id`
    assert (await client.post("/detokenize", json={"tokens": [prefix, *probe["tokens"]]})).json() == {
        "prompt": "\ntest"
    }


async def test_the_tokenizer_routes_need_a_key_where_keys_are_set(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=["k1"])
    for method, path, body in [
        ("GET", "/tokenizer_info", None),
        ("POST", "/tokenize", {"prompt": "a"}),
        ("POST", "/detokenize", {"tokens": [1]}),
    ]:
        assert (await client.request(method, path, json=body)).status_code == 401
        allowed = await client.request(method, path, json=body, headers={"Authorization": "Bearer k1"})
        assert allowed.status_code == 200
