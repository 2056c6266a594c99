"""Every route through the ASGI app: status, body, headers, as a client sees them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import MODEL_A, MODEL_B, MODEL_NAN, ClientFactory

pytestmark = pytest.mark.anyio


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per event; comments are skipped."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        if data:
            events.append((name, "\n".join(data)))
    return events


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# ---------------------------------------------------------------------------- health


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": MODEL_A}


async def test_not_ready_without_an_active_model(make_client: ClientFactory, tmp_path: Path) -> None:
    client = await make_client(models_dir=tmp_path / "empty")
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert "no active model" in ready.json()["error"]["message"]
    answer = await client.post("/generate", json={"prompt": "x"})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_not_ready"


async def test_default_model_setting_is_loaded_when_nothing_is_active(
    make_client: ClientFactory, models_dir: Path
) -> None:
    (models_dir / "ACTIVE").unlink()
    client = await make_client(default_model=MODEL_B)
    assert (await client.get("/readyz")).json()["model"] == MODEL_B
    assert not (models_dir / "ACTIVE").exists()  # serving a default does not move the registry's pointer


async def test_a_broken_active_model_keeps_the_service_not_ready(make_client: ClientFactory, models_dir: Path) -> None:
    (models_dir / "ACTIVE").write_text(MODEL_NAN + "\n")
    client = await make_client()
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert f"could not load model {MODEL_NAN}" in ready.json()["error"]["message"]
    assert "non-finite" in ready.json()["error"]["message"]
    fixed = await client.post(f"/models/{MODEL_A}/activate")
    assert fixed.status_code == 200
    assert (await client.get("/readyz")).status_code == 200


# ---------------------------------------------------------------------------- /generate


async def test_generate_json(client: httpx.AsyncClient) -> None:
    answer = await client.post("/generate", json={"prompt": "To be", "max_tokens": 12, "seed": 7})
    assert answer.status_code == 200
    assert answer.headers["x-model-version"] == MODEL_A
    body = answer.json()
    assert set(body) == {"id", "model", "text", "finish_reason", "usage"}
    assert body["model"] == MODEL_A
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert 0 < len(body["text"]) <= 12  # one char per token, the unknown token decodes to one char


async def test_generate_stream_events(client: httpx.AsyncClient) -> None:
    answer = await client.post("/generate", json={"prompt": "To be", "max_tokens": 10, "seed": 7, "stream": True})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["x-model-version"] == MODEL_A
    events = parse_sse(answer.text)
    names = [name for name, _ in events]
    assert names == ["token"] * (len(events) - 1) + ["done"]
    tokens = [json.loads(data) for _, data in events[:-1]]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    done = json.loads(events[-1][1])
    assert done == {
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15},
        "model": MODEL_A,
    }


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3},
        {"temperature": 1.5, "min_p": 0.05, "stop": ["e"]},
        {"temperature": 0},
    ],
)
async def test_same_seed_same_text_streamed_or_not(client: httpx.AsyncClient, params: dict) -> None:
    body = {"prompt": "Shall I", "max_tokens": 60, "seed": 1234, **params}
    whole = (await client.post("/generate", json=body)).json()
    again = (await client.post("/generate", json=body)).json()
    streamed = await client.post("/generate", json={**body, "stream": True})
    events = parse_sse(streamed.text)
    text = "".join(json.loads(data)["text"] for name, data in events if name == "token")
    done = json.loads(events[-1][1])
    assert whole["text"] == again["text"] == text
    assert whole["finish_reason"] == done["finish_reason"]
    assert whole["usage"] == done["usage"]


async def test_different_seeds_differ(client: httpx.AsyncClient) -> None:
    texts = {
        (await client.post("/generate", json={"prompt": "a", "max_tokens": 30, "seed": s})).json()["text"]
        for s in range(3)
    }
    assert len(texts) == 3


async def test_stop_string_ends_the_text(client: httpx.AsyncClient) -> None:
    body = {"prompt": "To be", "max_tokens": 80, "seed": 3}
    free = (await client.post("/generate", json=body)).json()["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # two characters the model does generate
    answer = (await client.post("/generate", json={**body, "stop": [stop]})).json()
    assert answer["finish_reason"] == "stop"
    assert answer["text"] == free[: free.index(stop)]


async def test_empty_prompt_starts_from_the_start_token(client: httpx.AsyncClient) -> None:
    answer = await client.post("/generate", json={"max_tokens": 5, "seed": 1})
    assert answer.status_code == 200
    assert answer.json()["usage"]["prompt_tokens"] == 1  # "\n"


async def test_generate_with_a_named_model(client: httpx.AsyncClient) -> None:
    body = {"prompt": "To be", "max_tokens": 20, "seed": 5}
    a = await client.post("/generate", json=body)
    b = await client.post("/generate", json={**body, "model": MODEL_B})
    assert b.status_code == 200
    assert b.headers["x-model-version"] == b.json()["model"] == MODEL_B
    assert a.json()["text"] != b.json()["text"]
    assert (await client.get("/readyz")).json()["model"] == MODEL_A  # naming a model does not activate it


async def test_max_loaded_models_1_serves_only_the_active_model(make_client: ClientFactory) -> None:
    client = await make_client(max_loaded_models=1)
    named = await client.post("/generate", json={"prompt": "x", "max_tokens": 3, "model": MODEL_B})
    assert named.status_code == 503
    error = named.json()["error"]
    assert error["code"] == "models_busy" and error["param"] == "model"
    assert "retry-after" not in named.headers  # retrying cannot help: the active model fills the bound
    loaded = {m["id"] for m in (await client.get("/models")).json()["models"] if m["loaded"]}
    assert loaded == {MODEL_A}


async def test_concurrent_requests_are_batched_and_keep_their_own_text(client: httpx.AsyncClient) -> None:
    import asyncio

    bodies = [{"prompt": p, "max_tokens": 40, "seed": i} for i, p in enumerate(["To", "Shall", "Or", "And"])]
    alone = [(await client.post("/generate", json=b)).json()["text"] for b in bodies]
    together = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    assert [r.json()["text"] for r in together] == alone
    samples = metric_samples((await client.get("/metrics")).text)
    steps = samples[("textgen_batch_size_count", ())]
    tokens = samples[("textgen_generated_tokens_total", ())]
    assert steps < tokens  # some steps advanced more than one sequence


# ---------------------------------------------------------------------------- /tokenize


async def test_tokenize(client: httpx.AsyncClient) -> None:
    answer = await client.post("/tokenize", json={"text": "To be"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["model"] == MODEL_A
    assert body["tokens"] == ["T", "o", " ", "b", "e"]
    assert body["count"] == len(body["ids"]) == 5
    unknown = (await client.post("/tokenize", json={"text": "€"})).json()
    assert unknown["count"] == 1  # a symbol outside the vocabulary is the unknown token, not an error


# ---------------------------------------------------------------------------- /models


async def test_list_and_show_models(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/models")).json()
    assert listing["active"] == MODEL_A
    by_id = {m["id"]: m for m in listing["models"]}
    assert set(by_id) == {MODEL_A, MODEL_B, MODEL_NAN}
    assert by_id[MODEL_A]["active"] and by_id[MODEL_A]["loaded"]
    assert not by_id[MODEL_B]["active"] and not by_id[MODEL_B]["loaded"]
    detail = (await client.get(f"/models/{MODEL_B}")).json()
    assert detail["architecture"]["hidden_dim"] == 16
    assert detail["chat_template"]["user"] == "Q: "
    assert detail["tokenizer"]["kind"] == "char"


async def test_activate_swaps_the_model(client: httpx.AsyncClient, models_dir: Path) -> None:
    answer = await client.post(f"/models/{MODEL_B}/activate")
    assert answer.status_code == 200
    assert answer.json()["active"] is True
    assert (models_dir / "ACTIVE").read_text().strip() == MODEL_B
    generated = await client.post("/generate", json={"prompt": "x", "max_tokens": 3})
    assert generated.headers["x-model-version"] == MODEL_B
    assert (await client.get("/readyz")).json()["model"] == MODEL_B
    samples = metric_samples((await client.get("/metrics")).text)
    assert samples[("textgen_model_info", (("model_id", MODEL_B),))] == 1.0
    assert samples[("textgen_model_swaps_total", (("result", "ok"),))] == 2.0  # startup + this one


async def test_activate_refuses_a_broken_checkpoint(client: httpx.AsyncClient, models_dir: Path) -> None:
    answer = await client.post(f"/models/{MODEL_NAN}/activate")
    assert answer.status_code == 422
    assert "non-finite" in answer.json()["error"]["message"]
    assert (models_dir / "ACTIVE").read_text().strip() == MODEL_A
    generated = await client.post("/generate", json={"prompt": "x", "max_tokens": 3})
    assert generated.status_code == 200
    assert generated.headers["x-model-version"] == MODEL_A
    samples = metric_samples((await client.get("/metrics")).text)
    assert samples[("textgen_model_swaps_total", (("result", "refused"),))] == 1.0


async def test_delete_model(client: httpx.AsyncClient, models_dir: Path) -> None:
    assert (await client.delete(f"/models/{MODEL_B}")).status_code == 204
    assert not (models_dir / MODEL_B).exists()
    assert (await client.get(f"/models/{MODEL_B}")).status_code == 404
    refused = await client.delete(f"/models/{MODEL_A}")
    assert refused.status_code == 409
    assert "active" in refused.json()["error"]["message"]


# ---------------------------------------------------------------------------- /v1


async def test_v1_models(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {MODEL_A, MODEL_B, MODEL_NAN, "production"}  # + the aliases
    assert all(m["object"] == "model" and m["created"] > 0 for m in listing["data"])
    one = (await client.get(f"/v1/models/{MODEL_B}")).json()
    assert one["id"] == MODEL_B


async def test_v1_completions_with_prompt_list_n_and_logprobs(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL_A, "prompt": ["To be", "Or"], "n": 2, "max_tokens": 6, "seed": 9, "logprobs": 3}
    answer = await client.post("/v1/completions", json=body)
    assert answer.status_code == 200
    assert answer.headers["x-model-version"] == MODEL_A
    completion = answer.json()
    assert completion["object"] == "text_completion"
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2, 3]
    assert completion["choices"][0]["text"] != completion["choices"][1]["text"]  # seed + choice index
    for choice in completion["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert all(x <= 0 for x in lp["token_logprobs"])
        assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"])
        assert "".join(lp["tokens"]) == choice["text"]
    assert completion["usage"] == {"prompt_tokens": 7, "completion_tokens": 24, "total_tokens": 31}


async def test_v1_completion_stream_matches_the_whole_answer(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL_A, "prompt": "To be", "max_tokens": 20, "seed": 4}
    whole = (await client.post("/v1/completions", json=body)).json()
    stream = await client.post(
        "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = parse_sse(stream.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


async def test_v1_chat_uses_the_models_template(client: httpx.AsyncClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"model": MODEL_B, "messages": messages, "seed": 2, "max_tokens": 40}
    answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200
    chat = answer.json()
    assert chat["object"] == "chat.completion"
    assert chat["model"] == MODEL_B
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant"
    # tiny-b's template renders "S: Be brief.\nQ: Hi\nA: " and stops at the next newline
    rendered = {"prompt": "S: Be brief.\nQ: Hi\nA: ", "stop": ["\n"], "model": MODEL_B, "seed": 2, "max_tokens": 40}
    same = (await client.post("/generate", json=rendered)).json()
    assert choice["message"]["content"] == same["text"]
    assert choice["finish_reason"] == same["finish_reason"]
    assert chat["usage"] == same["usage"]


async def test_v1_chat_stream_and_logprobs(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "seed": 2, "stop": ["zzz"]}
    whole = (await client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2})).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) <= 2 and t["logprob"] <= 0 for t in content)
    stream = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events = parse_sse(stream.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


# ---------------------------------------------------------------------------- /metrics and logging


async def test_metrics_parse_and_count(client: httpx.AsyncClient) -> None:
    await client.post("/generate", json={"prompt": "To be", "max_tokens": 5})
    await client.post("/generate", json={"prompt": "To be", "temperature": 99})
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = metric_samples(answer.text)
    names = {name for name, _ in samples}
    assert all(n.startswith("textgen_") for n in names)
    assert samples[("textgen_requests_total", (("route", "/generate"), ("status", "200")))] == 1
    assert samples[("textgen_requests_total", (("route", "/generate"), ("status", "422")))] == 1
    assert samples[("textgen_prompt_tokens_total", ())] == 5
    assert samples[("textgen_generated_tokens_total", ())] == 5
    assert samples[("textgen_time_to_first_token_seconds_count", ())] == 1
    assert samples[("textgen_inter_token_latency_seconds_count", ())] == 4
    assert samples[("textgen_e2e_latency_seconds_count", ())] == 1
    assert samples[("textgen_running_sequences", ())] == 0
    assert samples[("textgen_waiting_sequences", ())] == 0
    assert samples[("textgen_model_info", (("model_id", MODEL_A),))] == 1
    for name in ("textgen_requests_rejected_total", "textgen_batch_size_count"):
        assert (name, ()) in samples
    for reason in ("disconnected", "stalled"):
        assert samples[("textgen_generations_dropped_total", (("reason", reason),))] == 0


async def test_request_id_is_echoed_or_made_up(client: httpx.AsyncClient) -> None:
    given = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32


async def test_openapi_lists_every_route(client: httpx.AsyncClient) -> None:
    paths = set((await client.get("/openapi.json")).json()["paths"])
    assert {
        "/generate",
        "/tokenize",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/models",
        "/models/{model_id}",
        "/models/{model_id}/activate",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths


# ---------------------------------------------------------------------------- errors after the stream started


async def _cut_by_unload(make_client: ClientFactory, path: str, body: dict) -> str:
    """Start a long stream, unload every model (as a shutdown does), return what the client received."""
    import asyncio

    client = await make_client(max_tokens=1_000_000)
    state = client.app.state  # type: ignore[attr-defined]
    task = asyncio.create_task(client.post(path, json={**body, "max_tokens": 1_000_000, "stream": True}))
    for _ in range(500):
        if state.metrics.registry.get_sample_value("textgen_generated_tokens_total"):
            break
        await asyncio.sleep(0.01)
    await state.holder.close()
    answer = await task
    assert answer.status_code == 200
    return answer.text


async def test_an_error_after_the_stream_started_is_an_error_event(make_client: ClientFactory) -> None:
    events = parse_sse(await _cut_by_unload(make_client, "/generate", {"prompt": "To be"}))
    assert events[0][0] == "token"
    name, data = events[-1]
    assert name == "error"
    error = json.loads(data)["error"]
    assert set(error) == {"type", "message", "retryable", "request_id"}
    assert error["request_id"]  # the id of the request whose stream failed, as in its logs
    assert error["retryable"] is True
    assert "unloaded" in error["message"]
    assert [n for n, _ in events].count("done") == 0


async def test_an_error_in_an_openai_stream_is_an_error_chunk(make_client: ClientFactory) -> None:
    events = parse_sse(await _cut_by_unload(make_client, "/v1/completions", {"prompt": "To be"}))
    last = json.loads(events[-1][1])
    assert last["error"]["type"] == "server_error"
    assert last["error"]["request_id"]
    assert "unloaded" in last["error"]["message"]
