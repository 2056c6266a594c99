"""Through a real `textgen serve` process: SSE framing and keep-alives on the wire, the `openai`
client, overload, disconnects, hot swap during an open stream, JSON log lines.

The module's server (conftest.server) has 2 running slots, 1 waiting slot, a 0.2 s keep-alive and
JSON logs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

from tests.app.conftest import MODEL_A, MODEL_B, Server
from tests.app.test_routes import metric_samples, parse_sse

pytestmark = pytest.mark.slow

LONG = {"prompt": "To be", "max_tokens": 1_000_000, "stream": True}  # runs until the client leaves
DROPPED = ("textgen_generations_dropped_total", (("reason", "disconnected"),))


def metrics(server: Server) -> dict:
    return metric_samples(httpx.get(f"{server.url}/metrics").text)


def gauge(server: Server, name: str) -> float:
    return metrics(server)[(name, ())]


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def open_stream(stack: ExitStack, server: Server, body: dict) -> tuple[httpx.Response, Iterator[str]]:
    client = stack.enter_context(httpx.Client(base_url=server.url, timeout=10))
    response = stack.enter_context(client.stream("POST", "/generate", json=body))
    return response, response.iter_lines()


def test_sse_framing_on_the_wire(server: Server) -> None:
    body = {"prompt": "To be", "max_tokens": 15, "seed": 11, "stream": True}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-model-version"]
        raw = response.read().decode()
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert name == "event: token"
        assert set(json.loads(data.removeprefix("data: "))) == {"text", "index"}
    name, data = blocks[-1].split("\n")
    assert name == "event: done"
    done = json.loads(data.removeprefix("data: "))
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 15
    whole = httpx.post(f"{server.url}/generate", json={**body, "stream": False}).json()
    assert "".join(json.loads(d)["text"] for n, d in parse_sse(raw) if n == "token") == whole["text"]


def test_overload_keepalive_and_disconnect(server: Server) -> None:
    dropped_before = metrics(server)[DROPPED]
    with ExitStack() as running:
        first, first_lines = open_stream(running, server, LONG)
        second, second_lines = open_stream(running, server, LONG)
        assert next(first_lines) == "event: token" and next(second_lines) == "event: token"
        with ExitStack() as waiting:
            third, third_lines = open_stream(waiting, server, LONG)  # no free slot: it waits
            assert third.status_code == 200
            assert next(third_lines) == ": ping"  # an idle stream gets keep-alive comments
            assert gauge(server, "textgen_running_sequences") == 2
            assert gauge(server, "textgen_waiting_sequences") == 1

            refused = httpx.post(f"{server.url}/generate", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
        # the waiting client left: its place is free again
        assert wait_for(lambda: gauge(server, "textgen_waiting_sequences") == 0)
    # both running clients left: their sequences leave the batch at the next step
    assert wait_for(lambda: gauge(server, "textgen_running_sequences") == 0, timeout=2)
    assert metrics(server)[DROPPED] == dropped_before + 3
    assert httpx.post(f"{server.url}/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_client_that_gives_up_on_a_json_answer_frees_its_sequence(server: Server) -> None:
    dropped_before = metrics(server)[DROPPED]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json={**LONG, "stream": False}, timeout=0.5)
    assert wait_for(lambda: gauge(server, "textgen_running_sequences") == 0, timeout=2)
    assert metrics(server)[DROPPED] == dropped_before + 1


def test_openai_client_completions(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="dummy", max_retries=0)
    whole = client.completions.create(model=MODEL_A, prompt="To be", max_tokens=12, seed=5, temperature=0.8)
    assert whole.object == "text_completion"
    assert whole.model == MODEL_A
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    stream = client.completions.create(
        model=MODEL_A,
        prompt="To be",
        max_tokens=12,
        seed=5,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    several = client.completions.create(model=MODEL_A, prompt=["a", "b", "c"], max_tokens=3, logprobs=2)
    assert len(several.choices) == 3
    assert several.choices[0].logprobs is not None and len(several.choices[0].logprobs.tokens or []) == 3
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_A, prompt="x", n=9)
    with pytest.raises(openai.BadRequestError, match="at most 3 at a time"):
        client.completions.create(model=MODEL_A, prompt=["a", "b"], n=2)  # more than the server could ever run
    assert {m.id for m in client.models.list()} >= {MODEL_A, MODEL_B}


def test_openai_client_chat(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="dummy", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model=MODEL_B, messages=messages, max_tokens=30, seed=3)  # type: ignore[arg-type]
    assert whole.object == "chat.completion"
    message = whole.choices[0].message
    assert message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert "\n" not in (message.content or "")  # tiny-b's template stops at a newline
    stream = client.chat.completions.create(model=MODEL_B, messages=messages, max_tokens=30, seed=3, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_activate_during_an_open_stream(server: Server) -> None:
    admin = httpx.Client(base_url=server.url, timeout=10)
    assert admin.get("/readyz").json()["model"] == MODEL_A
    with ExitStack() as stack:
        stream, lines = open_stream(stack, server, {"prompt": "To be", "max_tokens": 4000, "stream": True})
        assert stream.headers["x-model-version"] == MODEL_A
        assert next(lines) == "event: token"
        swapped = admin.post(f"/models/{MODEL_B}/activate")
        assert swapped.status_code == 200
        assert gauge(server, "textgen_running_sequences") >= 1  # the stream is still being generated
        after = admin.post("/generate", json={"prompt": "x", "max_tokens": 3})
        assert after.headers["x-model-version"] == MODEL_B
        rest = "\n".join(lines)
    events = parse_sse("event: token\n" + rest)
    assert [name for name, _ in events].count("token") >= 1
    done = json.loads(events[-1][1])
    assert events[-1][0] == "done"
    assert done["model"] == MODEL_A and done["usage"]["completion_tokens"] == 4000
    assert admin.post(f"/models/{MODEL_A}/activate").status_code == 200  # leave the server as found
    admin.close()


def test_one_json_log_line_per_request(server: Server) -> None:
    httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "log-line-test"})
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "log-line-test"]
    assert len(mine) == 1
    assert mine[0]["path"] == "/healthz" and mine[0]["status"] == 200 and mine[0]["method"] == "GET"
    assert any("the API is open" in line["message"] for line in lines)
