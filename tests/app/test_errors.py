"""Bad inputs and their exact statuses, auth, limits, CORS: every error is JSON with an `error` object."""

from __future__ import annotations

import logging

import httpx
import pytest

from app.settings import Settings
from tests.app.conftest import MODEL_A, MODEL_B, ClientFactory, occupy_the_only_slot

pytestmark = pytest.mark.anyio

CAP = 500  # TEXTGEN_MAX_TOKENS in these tests
PROMPT_CAP = 100  # TEXTGEN_MAX_PROMPT_CHARS
BODY_CAP = 2000  # TEXTGEN_MAX_BODY_BYTES

CHAT = [{"role": "user", "content": "Hi"}]

# (method, path, JSON body, status, param the error names (None: no particular field))
BAD_INPUTS = [
    ("POST", "/generate", {"temperature": 5.1}, 422, "temperature"),
    ("POST", "/generate", {"temperature": -0.1}, 422, "temperature"),
    ("POST", "/generate", {"temperature": "hot"}, 422, "temperature"),
    ("POST", "/generate", {"top_k": -1}, 422, "top_k"),
    ("POST", "/generate", {"top_p": 0}, 422, "top_p"),
    ("POST", "/generate", {"top_p": 1.01}, 422, "top_p"),
    ("POST", "/generate", {"min_p": 1}, 422, "min_p"),
    ("POST", "/generate", {"min_p": -0.5}, 422, "min_p"),
    ("POST", "/generate", {"repetition_penalty": 0}, 422, "repetition_penalty"),
    ("POST", "/generate", {"repetition_penalty": 10.5}, 422, "repetition_penalty"),
    ("POST", "/generate", {"max_tokens": 0}, 422, "max_tokens"),
    ("POST", "/generate", {"max_tokens": CAP + 1}, 422, "max_tokens"),
    ("POST", "/generate", {"max_tokens": 2.5}, 422, "max_tokens"),
    ("POST", "/generate", {"stop": ["a"] * 9}, 422, "stop"),
    ("POST", "/generate", {"stop": [""]}, 422, "stop.0"),
    ("POST", "/generate", {"seed": -1}, 422, "seed"),
    ("POST", "/generate", {"seed": "abc"}, 422, "seed"),
    ("POST", "/generate", {"prompt": 123}, 422, "prompt"),
    ("POST", "/generate", {"prompt": "x" * (PROMPT_CAP + 1)}, 422, "prompt"),
    ("POST", "/generate", {"temprature": 1.0}, 422, "temprature"),
    ("POST", "/generate", {"stream": "maybe"}, 422, "stream"),
    ("POST", "/generate", {"model": "no-such-model"}, 404, "model"),
    ("POST", "/generate", {"model": "Not A Valid Id"}, 404, "model"),
    ("POST", "/generate", [], 422, None),
    ("GET", "/generate", None, 405, None),
    ("GET", "/no/such/route", None, 404, None),
    ("POST", "/tokenize", {}, 422, "text"),
    ("POST", "/tokenize", {"text": "x" * (PROMPT_CAP + 1)}, 422, "text"),
    ("POST", "/tokenize", {"text": "x", "model": "nope"}, 404, "model"),
    ("GET", "/models/no-such-model", None, 404, "model"),
    ("GET", "/models/a..b", None, 404, "model"),
    ("GET", "/models/%2E%2E%2Fetc", None, 404, None),
    ("GET", "/models/UPPER", None, 404, "model"),
    ("POST", "/models/no-such-model/activate", None, 404, "model"),
    ("DELETE", "/models/no-such-model", None, 404, "model"),
    ("DELETE", f"/models/{MODEL_A}", None, 409, None),
    ("POST", "/v1/completions", {"prompt": "x", "n": 9}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": 6}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": CAP + 1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x" * (PROMPT_CAP + 1)}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ("POST", "/v1/completions", {"prompt": [[1], []], "echo": True}, 400, "prompt.id_lists.1"),
    ("POST", "/v1/completions", {"prompt": [1, 100000], "max_tokens": 1}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ["a"] * 9}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 6}, 400, "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "stop": [f"s{i}" for i in range(8)]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "model": "gpt-4o"}, 404, "model"),
    ("GET", "/v1/models/no-such-model", None, 404, "model"),
]


@pytest.fixture
async def strict_client(make_client: ClientFactory) -> httpx.AsyncClient:
    return await make_client(max_tokens=CAP, max_prompt_chars=PROMPT_CAP, max_body_bytes=BODY_CAP)


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), BAD_INPUTS)
async def test_bad_input(
    strict_client: httpx.AsyncClient, method: str, path: str, body: object, status: int, param: str | None
) -> None:
    answer = await strict_client.request(method, path, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) >= {"type", "message", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param


async def test_limits_are_named_in_the_message(strict_client: httpx.AsyncClient) -> None:
    too_many = await strict_client.post("/generate", json={"max_tokens": CAP + 1})
    assert f"TEXTGEN_MAX_TOKENS={CAP}" in too_many.json()["error"]["message"]
    too_long = await strict_client.post("/generate", json={"prompt": "x" * (PROMPT_CAP + 1)})
    assert f"TEXTGEN_MAX_PROMPT_CHARS={PROMPT_CAP}" in too_long.json()["error"]["message"]


async def test_default_max_tokens_yield_to_a_lower_cap(make_client: ClientFactory) -> None:
    client = await make_client(max_tokens=7)
    chat = {"messages": CHAT}
    for path, body in (("/generate", {}), ("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", chat)):
        answer = await client.post(path, json={**body, "stop": ["zzz"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 7


async def test_body_over_the_limit_is_413(strict_client: httpx.AsyncClient) -> None:
    answer = await strict_client.post("/generate", json={"prompt": "x" * (BODY_CAP + 10)})
    assert answer.status_code == 413
    assert f"TEXTGEN_MAX_BODY_BYTES={BODY_CAP}" in answer.json()["error"]["message"]

    async def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(10):
            yield b" " * 500

    streamed = await strict_client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert streamed.json()["error"]["type"] == "request_too_large"


async def test_malformed_json_is_422_and_400_on_v1(strict_client: httpx.AsyncClient) -> None:
    headers = {"Content-Type": "application/json"}
    native = await strict_client.post("/generate", content=b'{"prompt": ', headers=headers)
    assert native.status_code == 422
    openai = await strict_client.post("/v1/completions", content=b'{"prompt": ', headers=headers)
    assert openai.status_code == 400
    assert openai.json()["error"]["type"] == "invalid_request_error"


async def test_overload_is_429_with_retry_after(make_client: ClientFactory) -> None:
    client = await make_client(max_running=1, max_waiting=0, max_tokens=100_000)
    long = await occupy_the_only_slot(client)
    refused = await client.post("/generate", json={"prompt": "b", "max_tokens": 5})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    openai = await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 5})
    assert openai.status_code == 429
    assert (await long).status_code == 200
    assert (await client.post("/generate", json={"prompt": "b", "max_tokens": 5})).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert "textgen_requests_rejected_total 2.0" in metrics


# ---------------------------------------------------------------------------- auth


@pytest.fixture
async def keyed_client(make_client: ClientFactory) -> httpx.AsyncClient:
    return await make_client(api_keys="user-key-1,user-key-2", admin_keys="admin-key")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_generation_needs_a_key(keyed_client: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "max_tokens": 2}
    missing = await keyed_client.post("/generate", json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    assert (await keyed_client.post("/generate", json=body, headers=bearer("wrong"))).status_code == 401
    assert (await keyed_client.post("/generate", json=body, headers={"Authorization": "Basic x"})).status_code == 401
    for key in ("user-key-1", "user-key-2", "admin-key"):
        assert (await keyed_client.post("/generate", json=body, headers=bearer(key))).status_code == 200
    for path in ("/v1/models", "/models", f"/models/{MODEL_A}"):
        assert (await keyed_client.get(path)).status_code == 401
        assert (await keyed_client.get(path, headers=bearer("user-key-1"))).status_code == 200
    v1 = await keyed_client.post("/v1/completions", json={"prompt": "x"})
    assert v1.status_code == 401
    assert v1.json()["error"]["code"] == "invalid_api_key"


async def test_registry_changes_need_an_admin_key(keyed_client: httpx.AsyncClient) -> None:
    path = f"/models/{MODEL_B}/activate"
    assert (await keyed_client.post(path)).status_code == 401
    wrong_scope = await keyed_client.post(path, headers=bearer("user-key-1"))
    assert wrong_scope.status_code == 403
    assert wrong_scope.json()["error"]["type"] == "permission_error"
    assert (await keyed_client.delete(f"/models/{MODEL_B}", headers=bearer("user-key-1"))).status_code == 403
    assert (await keyed_client.post(path, headers=bearer("admin-key"))).status_code == 200


async def test_health_readiness_and_metrics_stay_open(keyed_client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await keyed_client.get(path)).status_code == 200


async def test_api_keys_without_admin_keys_close_the_admin_routes(make_client: ClientFactory) -> None:
    client = await make_client(api_keys="user-key")
    assert (await client.post(f"/models/{MODEL_B}/activate", headers=bearer("user-key"))).status_code == 403


async def test_keys_are_never_logged(make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(api_keys="secret-user-key", admin_keys="secret-admin-key")
    await client.post("/generate", json={"prompt": "x", "max_tokens": 2}, headers=bearer("secret-user-key"))
    await client.post("/generate", json={"prompt": "x"}, headers=bearer("secret-guess"))
    await client.post(f"/models/{MODEL_B}/activate", headers=bearer("secret-admin-key"))
    assert caplog.records
    assert "secret" not in caplog.text


async def test_open_api_warns_at_startup(make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    await make_client()
    assert "the API is open" in caplog.text


def test_keys_and_origins_come_from_comma_separated_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_API_KEYS", "a, b,,c")
    monkeypatch.setenv("TEXTGEN_CORS_ORIGINS", "https://one.example,https://two.example")
    monkeypatch.setenv("TEXTGEN_MAX_RUNNING", "3")
    settings = Settings()
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.cors_origins == ["https://one.example", "https://two.example"]
    assert settings.max_running == 3
    assert settings.admin_keys == []


# ---------------------------------------------------------------------------- CORS


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    answer = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in answer.headers


async def test_cors_origins_are_configurable(make_client: ClientFactory) -> None:
    client = await make_client(cors_origins="https://app.example")
    preflight = await client.options(
        "/generate",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
