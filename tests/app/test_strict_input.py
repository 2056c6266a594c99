"""Strict input (docs/API.md, "Input rules"): values of the wrong kind, text that is not text, and
bodies that are not JSON are refused with the field (or the media type) named, on every route."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.app.conftest import MODEL_A, Server
from tests.jobs_support import TINY, shakespeare

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "Hi"}]
TEXT = shakespeare(2_000)

# (path, body, the field the error names): each value is one a lax parser would coerce
WRONG_KINDS = [
    ("/generate", {"max_tokens": "5"}, "max_tokens"),
    ("/generate", {"max_tokens": True}, "max_tokens"),
    ("/generate", {"max_tokens": 5.0}, "max_tokens"),
    ("/generate", {"temperature": "0.5"}, "temperature"),
    ("/generate", {"temperature": True}, "temperature"),
    ("/generate", {"top_k": "1"}, "top_k"),
    ("/generate", {"top_p": "1"}, "top_p"),
    ("/generate", {"min_p": False}, "min_p"),
    ("/generate", {"repetition_penalty": "1.1"}, "repetition_penalty"),
    ("/generate", {"seed": "42"}, "seed"),
    ("/generate", {"seed": True}, "seed"),
    ("/generate", {"stream": "yes"}, "stream"),
    ("/generate", {"stream": "true"}, "stream"),
    ("/generate", {"stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": "1"}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 1.5}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1.0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "false"}, "echo"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream": 0}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": "0"}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": False}, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": "2"}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": "5"}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5.5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/train", {"text": TEXT, "hidden_dim": "16"}, "hidden_dim"),
    ("/train", {"text": TEXT, "epochs": True}, "epochs"),
    ("/train", {"text": TEXT, "lr": "0.01"}, "lr"),
    ("/train", {"text": TEXT, "dropout": False}, "dropout"),
    ("/train", {"text": TEXT, "tie_weights": "true"}, "tie_weights"),
    ("/train", {"text": TEXT, "activate": "false"}, "activate"),
    ("/train", {"text": TEXT, "activate": 0}, "activate"),
]


def status_for(path: str) -> int:
    return 400 if path.startswith("/v1/") else 422


async def post_json(client: httpx.AsyncClient, path: str, body: object) -> httpx.Response:
    """`body` as ASCII JSON, so that a lone surrogate travels as the escape `\\ud800`, as a client sends it."""
    content = json.dumps(body, ensure_ascii=True).encode("ascii")
    return await client.post(path, content=content, headers={"Content-Type": "application/json"})


def assert_refused(answer: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["request_id"] == answer.headers["x-request-id"]
    return error


@pytest.mark.parametrize(("path", "body", "param"), WRONG_KINDS)
async def test_a_value_of_the_wrong_kind_is_refused_and_named(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    error = assert_refused(await client.post(path, json=body), status_for(path), param)
    assert error["code"] == "invalid_value"
    assert error["message"].startswith(f"{param}: ")


async def test_a_training_form_still_reads_its_fields_from_strings(client: httpx.AsyncClient) -> None:
    """Multipart fields are strings by nature: `"16"` is 16 there, and the submission gets as far as the batch check."""
    fields = {**{k: str(v) for k, v in TINY.items()}, "batch_size": "64", "tie_weights": "true"}
    answer = await client.post("/train", data=fields, files={"file": ("short.txt", TEXT[:100].encode())})
    error = assert_refused(answer, 422, "batch_size")
    assert "shorter than one batch" in error["message"]


# ---------------------------------------------------------------------------- what OpenAI clients send


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    """The official client, on the test app through ASGI."""
    return openai.AsyncOpenAI(base_url="http://textgen.test/v1", api_key="unused", http_client=client, max_retries=0)


async def test_what_the_openai_sdk_sends_is_accepted(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(
        model=MODEL_A,
        prompt=["To be", "or not"],
        max_tokens=3,
        temperature=1,  # an int where a float belongs is still a number
        top_p=1,
        n=2,
        stop="\n",
        seed=7,
        user="someone",
        logprobs=2,
        presence_penalty=0,
        frequency_penalty=0.5,
        echo=False,
        logit_bias={"5": -100, "6": 2.5},  # token ids of the model's tokenizer
    )
    assert len(completion.choices) == 4
    assert completion.choices[0].logprobs is not None
    chat = await sdk.chat.completions.create(
        model=MODEL_A,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi 猫 🙂"}]},
        ],
        max_completion_tokens=3,
        temperature=0,
        stop=["\nUser:", "zz"],
        seed=1,
        logprobs=True,
        top_logprobs=2,
        user="someone",
    )
    assert chat.choices[0].logprobs is not None
    streamed = await sdk.chat.completions.create(
        model=MODEL_A, messages=CHAT, max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in streamed]
    assert chunks[-1].usage is not None


async def test_null_means_the_default_on_v1(client: httpx.AsyncClient) -> None:
    """OpenAI's optional parameters are nullable; some clients send null for each one they leave unset."""
    nulls = dict.fromkeys(
        ["model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user"]
        + ["presence_penalty", "frequency_penalty", "logit_bias"]
    )
    completion = await client.post("/v1/completions", json={**nulls, "prompt": "x", "logprobs": None, "echo": None})
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 1
    chat = {**nulls, "messages": CHAT, "max_completion_tokens": None, "logprobs": None, "top_logprobs": None}
    answer = await client.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert_refused(await client.post("/v1/chat/completions", json={"messages": None}), 400, "messages")


async def test_the_sdk_gets_a_bad_request_naming_the_field(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.completions.create(model=MODEL_A, prompt="x", extra_body={"max_tokens": "5"})
    assert refused.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.completions.create(model=MODEL_A, prompt="x", extra_body={"logprobs": True})
    assert refused.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model=MODEL_A, messages=CHAT, extra_body={"top_logprobs": "1"})
    assert refused.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.completions.create(model=MODEL_A, prompt="a\x00", max_tokens=2)  # (it cannot send a lone surrogate)
    assert refused.value.param == "prompt"


# ---------------------------------------------------------------------------- text


BAD = "\x00"  # the placeholder in TEXT_FIELDS, replaced by each character the rule refuses

# (path, body with BAD somewhere in a text field, the field the error names)
TEXT_FIELDS = [
    ("/generate", {"prompt": f"To be{BAD}"}, "prompt"),
    ("/generate", {"prompt": "x", "stop": BAD}, "stop"),
    ("/generate", {"prompt": "x", "stop": ["ok", f"a{BAD}"]}, "stop"),
    ("/generate", {"model": f"tiny-a{BAD}"}, "model"),
    ("/tokenize", {"text": f"{BAD}abc"}, "text"),
    ("/tokenize", {"text": "abc", "model": BAD}, "model"),
    ("/v1/completions", {"prompt": f"x{BAD}"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", f"x{BAD}"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [BAD]}, "stop"),
    ("/v1/completions", {"prompt": "x", "user": f"u{BAD}"}, "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Hi{BAD}"}]}, "messages.0.content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": BAD}]}]},
        "messages.0.content.parts.1.text",
    ),
    ("/v1/chat/completions", {"messages": CHAT, "stop": f"{BAD}x"}, "stop"),
    ("/train", {"text": TEXT + BAD}, "text"),
    ("/train", {"text": TEXT, "name": f"poems{BAD}"}, "name"),
    ("/train", {"text": TEXT, "base_model": f"{MODEL_A}{BAD}"}, "base_model"),
    ("/train", {"corpus": f"shakespeare{BAD}"}, "corpus"),
]
# (character, what the message calls it)
REFUSED = [
    ("\x00", "NUL character (U+0000)"),
    ("\ud800", "lone surrogate (U+D800)"),
    ("\udfff", "lone surrogate (U+DFFF)"),
]


def with_char(value: Any, char: str) -> Any:
    if isinstance(value, str):
        return value.replace(BAD, char)
    if isinstance(value, list):
        return [with_char(item, char) for item in value]
    if isinstance(value, dict):
        return {key: with_char(item, char) for key, item in value.items()}
    return value


@pytest.mark.parametrize(("char", "called"), REFUSED, ids=["nul", "high-surrogate", "low-surrogate"])
@pytest.mark.parametrize(("path", "body", "param"), TEXT_FIELDS)
async def test_nul_and_lone_surrogates_are_refused_in_every_text_field(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str, char: str, called: str
) -> None:
    answer = await post_json(client, path, with_char(body, char))
    error = assert_refused(answer, status_for(path), param)
    assert called in error["message"]
    assert (await client.get("/train")).json() == {"jobs": []}


async def test_a_training_form_field_follows_the_text_rule(client: httpx.AsyncClient) -> None:
    answer = await client.post("/train", data={"name": "a\x00b"}, files={"file": ("corpus.txt", TEXT.encode())})
    assert "NUL" in assert_refused(answer, 422, "name")["message"]


async def test_text_that_is_text_passes(client: httpx.AsyncClient) -> None:
    """A surrogate pair escaped in JSON is one character; tabs, newlines, CJK and emoji are text."""
    text = "Tab\there\nnew line, 猫, café, 🙂"
    escaped = json.dumps({"text": text}, ensure_ascii=True)
    assert "\\ud83d\\ude42" in escaped
    answer = await client.post("/tokenize", content=escaped, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["count"] == len(text)  # a char model: one token per character, the emoji one of them
    generated = await post_json(client, "/generate", {"prompt": text, "max_tokens": 2, "stop": ["🙂"]})
    assert generated.status_code == 200, generated.text


# ---------------------------------------------------------------------------- media types


JSON_ROUTES = [
    ("/generate", {"prompt": "x", "max_tokens": 1}),
    ("/tokenize", {"text": "x"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    ("/train", {"text": TEXT, **TINY}),
]
NOT_JSON = {
    "text/plain": "text/plain",
    "text/plain;charset=UTF-8": "text/plain",  # fetch() with a string body and no headers
    "application/x-www-form-urlencoded": "application/x-www-form-urlencoded",  # curl -d
    "application/xml": "application/xml",
    None: "has no Content-Type",  # no header at all, with a JSON body
}


@pytest.mark.parametrize("content_type", list(NOT_JSON), ids=lambda c: str(c))
@pytest.mark.parametrize(("path", "body"), JSON_ROUTES, ids=[path for path, _ in JSON_ROUTES])
async def test_a_body_that_is_not_json_is_415(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    answer = await client.post(path, content=json.dumps(body), headers=headers)
    assert answer.status_code == 415, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unsupported_media_type"
    assert error["request_id"] == answer.headers["x-request-id"]
    assert NOT_JSON[content_type] in error["message"]
    assert "application/json" in error["message"]
    assert (await client.get("/train")).json() == {"jobs": []}


async def test_curl_d_is_told_how_to_send_json(client: httpx.AsyncClient) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = await client.post("/generate", content=b'{"prompt": "x"}', headers=form)
    assert answer.status_code == 415
    assert "curl --json" in answer.json()["error"]["message"]


async def test_json_with_parameters_and_bodiless_posts_keep_their_answers(client: httpx.AsyncClient) -> None:
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        answer = await client.post("/generate", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 200, answer.text
    empty = await client.post("/generate")  # no body, no type: a validation error, not a media type
    assert empty.status_code == 422
    plain = {"Content-Type": "text/plain"}
    bodiless_route = await client.post(f"/models/{MODEL_A}/activate", content=b"x", headers=plain)
    assert bodiless_route.status_code == 200  # a route that takes no body ignores one


async def test_multipart_is_still_taken_where_a_route_takes_uploads(client: httpx.AsyncClient) -> None:
    answer = await client.post("/train", data={"batch_size": "64"}, files={"file": ("c.txt", TEXT[:100].encode())})
    assert_refused(answer, 422, "batch_size")  # read as a form, then refused for the reason a form can have
    for path, body in JSON_ROUTES[:4]:
        form = await client.post(path, data={k: str(v) for k, v in body.items()}, files={"file": ("c.txt", b"x")})
        assert form.status_code == 415, form.text


async def test_the_schema_documents_415_on_every_route_that_takes_a_body(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    with_body = {f"{method.upper()} {path}": op for path, ops in spec["paths"].items() for method, op in ops.items()}
    taking = {name: op for name, op in with_body.items() if "requestBody" in op}
    assert {f"POST {path}" for path, _ in JSON_ROUTES} <= set(taking)
    missing = sorted(name for name, op in taking.items() if "415" not in op["responses"])
    assert missing == []


def test_the_rules_hold_on_the_wire(server: Server) -> None:
    """Through uvicorn, as a client sends the bytes: the same three answers."""
    json_type = {"Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=30) as wire:
        coerced = wire.post("/generate", content=b'{"prompt": "x", "max_tokens": "5"}', headers=json_type)
        assert_refused(coerced, 422, "max_tokens")
        surrogate = wire.post("/v1/completions", content=b'{"prompt": "x\\ud800", "max_tokens": 1}', headers=json_type)
        assert_refused(surrogate, 400, "prompt")
        plain = wire.post("/generate", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        assert plain.json()["error"]["code"] == "unsupported_media_type"
