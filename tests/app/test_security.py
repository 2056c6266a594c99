"""Hostile input and what must never leak: request ids on every error, the per-key sequence limit,
names that try to leave their folder, and keys that must appear in no answer, log line or metric."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.logging import RequestIdFilter, TextFormatter
from tests.app.conftest import MODEL_A, ClientFactory

pytestmark = pytest.mark.anyio

USER_KEY = "sk-user-7f3c9a1e5b"
OTHER_KEY = "sk-other-2d8e4b6f0a"
ADMIN_KEY = "sk-admin-9b1d3f5e7c"
WRONG_KEY = "sk-wrong-4a6c8e0b2d"
KEYS = (USER_KEY, OTHER_KEY, ADMIN_KEY, WRONG_KEY)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(make_client: ClientFactory) -> httpx.AsyncClient:
    """Two user keys that may each run one sequence, an admin key, a generous token cap."""
    return await make_client(
        api_keys=f"{USER_KEY},{OTHER_KEY}", admin_keys=ADMIN_KEY, max_running_per_key=1, max_tokens=100_000
    )


async def until_admitted(client: httpx.AsyncClient, n: int) -> None:
    for _ in range(500):
        if client.app.state.admission.admitted >= n:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} sequences never got admitted")


# ---------------------------------------------------------------------------- request ids

ERRORS = [  # (method, path, JSON body, headers, status)
    ("GET", "/no/such/route", None, {}, 404),
    ("GET", "/generate", None, {}, 405),
    ("POST", "/generate", {"temperature": 9}, bearer(USER_KEY), 422),
    ("POST", "/generate", {"prompt": "x"}, {}, 401),
    ("POST", "/generate", {"prompt": "x"}, bearer(WRONG_KEY), 401),
    ("POST", "/generate", {"model": "../tiny-a"}, bearer(USER_KEY), 404),
    ("POST", "/generate", {"prompt": "x" * 3_000_000}, bearer(USER_KEY), 413),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, bearer(USER_KEY), 400),
    ("POST", f"/models/{MODEL_A}/activate", None, bearer(USER_KEY), 403),
    ("DELETE", f"/models/{MODEL_A}", None, bearer(ADMIN_KEY), 409),
    ("GET", "/train/no-such-job", None, bearer(ADMIN_KEY), 404),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status"), ERRORS)
async def test_every_error_body_carries_the_request_id(
    keyed: httpx.AsyncClient, method: str, path: str, body: object, headers: dict[str, str], status: int
) -> None:
    made_up = await keyed.request(method, path, json=body, headers=headers)
    assert made_up.status_code == status, made_up.text
    assert made_up.json()["error"]["request_id"] == made_up.headers["x-request-id"]
    assert len(made_up.headers.get_list("x-request-id")) == 1

    given = await keyed.request(method, path, json=body, headers={**headers, "X-Request-ID": "trace-42"})
    assert given.json()["error"]["request_id"] == "trace-42"
    assert given.headers["x-request-id"] == "trace-42"


@pytest.fixture
def text_log() -> Iterator[list[str]]:
    """The lines `textgen serve` writes in text mode (its formatter and filter), while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.INFO)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


async def test_every_log_line_of_a_request_carries_its_id(keyed: httpx.AsyncClient, text_log: list[str]) -> None:
    await keyed.post("/models/tiny-b/activate", headers={**bearer(ADMIN_KEY), "X-Request-ID": "log-7"})
    body = {"prompt": "O", "max_tokens": 3}
    await keyed.post("/generate", json=body, headers={**bearer(USER_KEY), "X-Request-ID": "log-8"})
    # not the test client's own lines, nor the engine thread's: an engine outlives the request that loaded it
    server_lines = [line for line in text_log if " httpx: " not in line and " app.engine." not in line]
    seven = [line for line in server_lines if "log-7" in line or "/activate" in line or "tiny-b" in line]
    eight = [line for line in server_lines if "POST /generate" in line]
    assert len(seven) >= 2 and all("[log-7]" in line for line in seven), text_log
    assert eight and all("[log-8]" in line for line in eight), text_log


# ---------------------------------------------------------------------------- per-key limit


async def test_one_key_cannot_take_every_slot(keyed: httpx.AsyncClient) -> None:
    long = asyncio.create_task(  # outlasts the 0.25 s a client at its limit waits for its own slots
        keyed.post("/generate", json={"prompt": "a", "max_tokens": 50_000}, headers=bearer(USER_KEY))
    )
    await until_admitted(keyed, 1)
    short = {"prompt": "b", "max_tokens": 3}
    refused = await keyed.post("/generate", json=short, headers=bearer(USER_KEY))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "key_overloaded"
    v1 = await keyed.post("/v1/completions", json={"prompt": "b", "max_tokens": 3}, headers=bearer(USER_KEY))
    assert v1.status_code == 429
    # another client is still served while the first one holds its slot
    assert (await keyed.post("/generate", json=short, headers=bearer(OTHER_KEY))).status_code == 200
    assert (await long).status_code == 200
    assert (await keyed.post("/generate", json=short, headers=bearer(USER_KEY))).status_code == 200
    assert keyed.app.state.key_limits.admitted == {}  # type: ignore[attr-defined]
    assert keyed.app.state.admission.admitted == 0  # type: ignore[attr-defined]


async def test_a_request_larger_than_the_key_limit_is_refused_outright(keyed: httpx.AsyncClient) -> None:
    answer = await keyed.post(
        "/v1/completions", json={"prompt": "b", "max_tokens": 2, "n": 2}, headers=bearer(USER_KEY)
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "n"
    assert "TEXTGEN_MAX_RUNNING_PER_KEY=1" in answer.json()["error"]["message"]


async def test_a_key_s_slots_come_back_when_its_stream_is_dropped(keyed: httpx.AsyncClient) -> None:
    body = {"prompt": "a", "max_tokens": 5000, "stream": True}
    async with keyed.stream("POST", "/generate", json=body, headers=bearer(USER_KEY)) as stream:
        assert stream.status_code == 200
        async for _ in stream.aiter_lines():
            break  # the client leaves mid-stream
    for _ in range(300):
        if not keyed.app.state.key_limits.admitted:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert keyed.app.state.key_limits.admitted == {}  # type: ignore[attr-defined]
    short = {"prompt": "b", "max_tokens": 3}
    assert (await keyed.post("/generate", json=short, headers=bearer(USER_KEY))).status_code == 200


# ---------------------------------------------------------------------------- names that leave their folder

ESCAPES = ["../secret", "../../secret", "/etc/passwd", "shipped/../../secret", "..", ".", "shipped/", "%2e%2e/secret"]


@pytest.fixture
async def with_data(make_client: ClientFactory, tmp_path: Path) -> httpx.AsyncClient:
    """A data folder with one shipped corpus, and a secret file next to it that no name may reach."""
    data = tmp_path / "data"
    (data / "shipped").mkdir(parents=True)
    (data / "shipped" / "shipped.txt").write_text("a shipped corpus\n" * 50)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "secret.txt").write_text("TOP-SECRET-CONTENT\n" * 500)
    (data / "passwd").mkdir()
    return await make_client(data_dir=data)


@pytest.mark.parametrize("name", ESCAPES)
async def test_a_corpus_name_cannot_reach_outside_the_data_folder(with_data: httpx.AsyncClient, name: str) -> None:
    answer = await with_data.post("/train", json={"corpus": name, "epochs": 1})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == "corpus"
    assert "TOP-SECRET" not in answer.text
    assert (await with_data.get("/train")).json()["jobs"] == []


@pytest.mark.parametrize("name", ["../tiny-a", "tiny-a/../tiny-b", "/tmp/x", "..", "a" * 200])
async def test_a_model_id_cannot_reach_outside_the_models_folder(make_client: ClientFactory, name: str) -> None:
    client = await make_client()
    assert (await client.post("/generate", json={"model": name, "max_tokens": 1})).status_code == 404
    assert (await client.post("/tokenize", json={"model": name, "text": "x"})).status_code == 404
    trained = await client.post("/train", json={"text": "x" * 4000, "name": name})
    assert trained.status_code == 422
    assert trained.json()["error"]["param"] == "name"
    based = await client.post("/train", json={"text": "x" * 4000, "base_model": name})
    assert based.status_code == 422
    assert based.json()["error"]["param"] == "base_model"


# ---------------------------------------------------------------------------- keys never leak


async def test_keys_appear_in_no_answer_log_line_or_metric(
    keyed: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answers = []
    for key in KEYS:
        for method, path, body in [
            ("POST", "/generate", {"prompt": "O", "max_tokens": 2}),
            ("POST", "/generate", {"temperature": 99}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
            ("POST", "/v1/completions", {"prompt": "x", "n": 5}),
            ("GET", "/models", None),
            ("POST", f"/models/{MODEL_A}/activate", None),
            ("POST", "/train", {"corpus": "../nope"}),
            ("GET", "/train", None),
        ]:
            answers.append(await keyed.request(method, path, json=body, headers=bearer(key)))
    answers.append(await keyed.get("/metrics"))
    answers.append(await keyed.get("/readyz"))
    assert {a.status_code for a in answers} >= {200, 400, 401, 403, 422}
    seen = "\n".join(a.text + str(a.headers) for a in answers)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records) + caplog.text
    for key in KEYS:
        assert key not in seen
        assert key not in logged
        assert key[3:] not in seen + logged  # nor the secret part without its prefix
