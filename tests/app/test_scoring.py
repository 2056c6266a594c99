"""Prompt scoring: `echo` + `logprobs` on /v1/completions (through the official `openai` SDK), the prompt
forms, `max_tokens: 0`, `prompt_logprobs` on /generate (JSON and SSE), and agreement with `textgen eval`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lm.data import batchify
from lm.registry import Registry
from tests.app.conftest import MODEL_A, ROOT, ClientFactory, occupy_the_only_slot

pytestmark = pytest.mark.anyio

PROMPT = "To be, or not"


@pytest.fixture
def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    """The official client, on the test app through ASGI."""
    return openai.AsyncOpenAI(base_url="http://textgen.test/v1", api_key="unused", http_client=client, max_retries=0)


def model_logprobs(models_dir: Path, ids: list[int]) -> list[float]:
    """The oracle: log-softmax of the model's own forward over the whole sequence, from the zero state."""
    model = Registry(models_dir).load(MODEL_A).model.eval()
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))  # (1, T, V)
    lp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
    return [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


async def tokenize(client: httpx.AsyncClient, text: str) -> list[int]:
    answer = await client.post("/tokenize", json={"text": text})
    assert answer.status_code == 200, answer.text
    ids: list[int] = answer.json()["ids"]
    return ids


# ---------------------------------------------------------------------------- /v1/completions


async def test_echo_scores_the_prompt_through_the_sdk(sdk: openai.AsyncOpenAI, models_dir: Path) -> None:
    out = await sdk.completions.create(model=MODEL_A, prompt=PROMPT, echo=True, logprobs=5, max_tokens=0)
    (choice,) = out.choices
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPT), 0)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens == list(PROMPT)  # a char model
    assert lp.text_offset == list(range(len(PROMPT)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    oracle = model_logprobs(models_dir, Registry(models_dir).load(MODEL_A).tokenizer.encode(PROMPT))
    assert lp.token_logprobs[1:] == pytest.approx(oracle, abs=1e-5)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert len(top) == 5
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert chosen <= max(top.values()) + 1e-6
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5


async def test_echo_then_the_completion_as_without_echo(sdk: openai.AsyncOpenAI) -> None:
    plain = await sdk.completions.create(model=MODEL_A, prompt=PROMPT, max_tokens=6, logprobs=2, seed=5)
    echoed = await sdk.completions.create(model=MODEL_A, prompt=PROMPT, max_tokens=6, logprobs=2, seed=5, echo=True)
    p, e = plain.choices[0], echoed.choices[0]
    assert e.text == PROMPT + p.text
    assert p.logprobs is not None and e.logprobs is not None
    assert e.logprobs.tokens == list(PROMPT) + p.logprobs.tokens
    assert e.logprobs.token_logprobs[len(PROMPT) :] == p.logprobs.token_logprobs
    assert e.logprobs.top_logprobs[len(PROMPT) :] == p.logprobs.top_logprobs
    assert e.logprobs.text_offset == list(range(len(PROMPT))) + [len(PROMPT) + o for o in p.logprobs.text_offset]
    assert echoed.usage == plain.usage
    # echo without logprobs: the text only
    bare = await sdk.completions.create(model=MODEL_A, prompt=PROMPT, max_tokens=6, seed=5, echo=True)
    assert bare.choices[0].text == e.text and bare.choices[0].logprobs is None


async def test_each_prompt_form_is_its_own_choices(sdk: openai.AsyncOpenAI, client: httpx.AsyncClient) -> None:
    ids = await tokenize(client, "Shall I")
    texts = await sdk.completions.create(
        model=MODEL_A, prompt=["To be", "Shall I"], echo=True, logprobs=1, max_tokens=0, n=2
    )
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]  # prompt by prompt, then by n
    assert [c.text for c in texts.choices] == ["To be", "To be", "Shall I", "Shall I"]
    assert texts.usage is not None and texts.usage.prompt_tokens == len("To be") + len("Shall I")  # each prompt once
    one = await sdk.completions.create(model=MODEL_A, prompt=ids, echo=True, logprobs=1, max_tokens=0)
    assert one.choices[0].text == "Shall I"
    alone, batched = one.choices[0].logprobs, texts.choices[2].logprobs
    assert alone is not None and batched is not None
    assert (alone.tokens, alone.text_offset) == (batched.tokens, batched.text_offset)
    assert alone.token_logprobs[0] is None and batched.token_logprobs[0] is None
    assert alone.token_logprobs[1:] == pytest.approx(batched.token_logprobs[1:], abs=1e-5)  # float rounding only
    lists = await sdk.completions.create(
        model=MODEL_A, prompt=[ids, ids[:2]], echo=True, logprobs=1, max_tokens=3, seed=1, n=2
    )
    assert [c.index for c in lists.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith("Shall I") for c in lists.choices[:2])
    assert all(c.text.startswith("Sh") for c in lists.choices[2:])
    for c in lists.choices:
        assert c.logprobs is not None and c.logprobs.token_logprobs[0] is None
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.text_offset)
    # the same prompt as ids or as text: the same completion under a seed
    as_text = await sdk.completions.create(model=MODEL_A, prompt="Shall I", max_tokens=5, seed=3)
    as_ids = await sdk.completions.create(model=MODEL_A, prompt=ids, max_tokens=5, seed=3)
    assert as_ids.choices[0].text == as_text.choices[0].text


async def test_max_tokens_0_needs_echo(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="echo") as refused:
        await sdk.completions.create(model=MODEL_A, prompt=PROMPT, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        await sdk.completions.create(model=MODEL_A, prompt=[[1, 2], [10**6]], echo=True, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model=MODEL_A, messages=[{"role": "user", "content": "x"}], max_tokens=0)


async def test_echo_streams_the_prompt_first(sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.completions.create(model=MODEL_A, prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, seed=9)
    stream = await sdk.completions.create(
        model=MODEL_A, prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, seed=9, stream=True
    )
    chunks = [c async for c in stream]
    first = chunks[0].choices[0]
    assert first.text == PROMPT
    assert first.logprobs is not None and first.logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    joined = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert whole.choices[0].logprobs is not None
    assert joined == whole.choices[0].logprobs.token_logprobs
    assert offsets == whole.choices[0].logprobs.text_offset
    # max_tokens 0, streamed: the prompt, a finish, the usage
    only = await sdk.completions.create(
        model=MODEL_A,
        prompt=PROMPT,
        echo=True,
        logprobs=1,
        max_tokens=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in only]
    assert [c.choices[0].text for c in chunks[:2]] == [PROMPT, ""]
    assert chunks[1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0


async def test_scoring_holds_an_admission_slot(make_client: ClientFactory) -> None:
    client = await make_client(max_running=1, max_waiting=0, max_tokens=100_000)
    long = await occupy_the_only_slot(client)
    refused = await client.post("/v1/completions", json={"prompt": "b", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert refused.status_code == 429, refused.text
    assert (await long).status_code == 200
    scored = await client.post("/v1/completions", json={"prompt": "b", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert scored.status_code == 200
    assert client.app.state.admission.admitted == 0  # type: ignore[attr-defined]


async def test_a_prompt_over_the_cap_is_refused_before_scoring(make_client: ClientFactory) -> None:
    client = await make_client(max_prompt_chars=8)
    for prompt in ["x" * 9, list(range(9)), [[1], list(range(9))]]:
        answer = await client.post("/v1/completions", json={"prompt": prompt, "echo": True, "max_tokens": 0})
        assert answer.status_code == 400, answer.text
        assert "TEXTGEN_MAX_PROMPT_CHARS=8" in answer.json()["error"]["message"]
    answer = await client.post("/generate", json={"prompt": "x" * 9, "prompt_logprobs": 1, "max_tokens": 0})
    assert answer.status_code == 422


async def test_echo_needs_a_key_where_keys_are_set(make_client: ClientFactory) -> None:
    client = await make_client(api_keys="user-key")
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0}
    assert (await client.post("/v1/completions", json=body)).status_code == 401
    answer = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer user-key"})
    assert answer.status_code == 200


# ---------------------------------------------------------------------------- /generate


async def test_generate_prompt_logprobs_in_json_and_sse(client: httpx.AsyncClient) -> None:
    echo = await client.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 3, "max_tokens": 0})
    reference = echo.json()["choices"][0]["logprobs"]
    body = {"prompt": PROMPT, "prompt_logprobs": 3, "max_tokens": 8, "seed": 4}
    answer = await client.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    scored = result["prompt_logprobs"]
    assert [p["token"] for p in scored] == reference["tokens"]
    assert [p["logprob"] for p in scored] == reference["token_logprobs"]
    assert [p["top_logprobs"] for p in scored] == reference["top_logprobs"]
    assert [p["offset"] for p in scored] == reference["text_offset"]
    assert [p["id"] for p in scored] == await tokenize(client, PROMPT)
    plain = (await client.post("/generate", json={**body, "prompt_logprobs": None})).json()
    assert "prompt_logprobs" not in plain  # the answer is unchanged unless asked
    assert plain["text"] == result["text"] and plain["usage"] == result["usage"]

    events = await sse_events(client, {**body, "stream": True})
    assert [name for name, _ in events][0] == "prompt"
    assert events[0][1] == {"prompt_logprobs": scored}
    assert [name for name, _ in events][-1] == "done"
    assert "".join(data["text"] for name, data in events if name == "token") == result["text"]

    only = await client.post("/generate", json={**body, "max_tokens": 0})
    assert only.status_code == 200
    assert only.json()["text"] == "" and only.json()["finish_reason"] == "length"
    assert only.json()["prompt_logprobs"] == scored
    events = await sse_events(client, {**body, "max_tokens": 0, "stream": True})
    assert [name for name, _ in events] == ["prompt", "done"]
    assert events[1][1]["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 0, "total_tokens": len(PROMPT)}


async def test_generate_max_tokens_0_needs_prompt_logprobs(client: httpx.AsyncClient) -> None:
    answer = await client.post("/generate", json={"prompt": PROMPT, "max_tokens": 0})
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "max_tokens"
    assert "prompt_logprobs" in answer.json()["error"]["message"]
    answer = await client.post("/generate", json={"prompt": PROMPT, "prompt_logprobs": 6})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "prompt_logprobs"


async def sse_events(client: httpx.AsyncClient, body: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    answer = await client.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    events = []
    for block in answer.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# ---------------------------------------------------------------------------- agreement with `textgen eval`


SHIPPED = "shakespeare-char"


@pytest.fixture(scope="module")
def shipped_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of a shipped model's folder (the server must not touch the repository's models folder)."""
    path = tmp_path_factory.mktemp("shipped") / "models"
    shutil.copytree(ROOT / "models" / SHIPPED, path / SHIPPED)
    return path


def textgen_eval(models_dir: Path, corpus: Path) -> dict[str, float]:
    """`textgen eval --json`, the way a user runs it."""
    env = {**os.environ, "TEXTGEN_MODELS_DIR": str(models_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "textgen", "eval", str(corpus), "--model", SHIPPED, "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, float] = json.loads(proc.stdout)
    return result


async def test_echo_agrees_with_textgen_eval(make_client: ClientFactory, shipped_models: Path, tmp_path: Path) -> None:
    """The mean negative log-likelihood from echo equals eval's loss within 1e-4.

    `textgen eval` splits the text's ids into up to 16 contiguous streams (lm.data.batchify: the ragged
    tail is dropped), runs each from the zero state, and scores every token but each stream's first. So
    the streams are sent as prompts of token ids, and the first (null) logprob of each is left out."""
    text = (ROOT / "data" / "shakespeare" / "shakespeare.txt").read_text(encoding="utf-8")[-3000:]  # held out
    corpus = tmp_path / "held-out.txt"
    corpus.write_text(text, encoding="utf-8")
    expected = textgen_eval(shipped_models, corpus)

    client = await make_client(models_dir=shipped_models, default_model=SHIPPED, decode="reference")
    ids = await tokenize(client, text)
    streams = max(1, min(16, (len(ids) - 1) // 2))  # as lm.train.evaluate.evaluate splits it
    rows = batchify(torch.tensor(ids), streams).tolist()
    total, count = 0.0, 0
    for start in range(0, len(rows), 8):  # at most 8 prompts a request
        body = {"model": SHIPPED, "prompt": rows[start : start + 8], "echo": True, "logprobs": 0, "max_tokens": 0}
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        for choice in answer.json()["choices"]:
            scores = choice["logprobs"]["token_logprobs"]
            assert scores[0] is None
            total -= sum(scores[1:])
            count += len(scores) - 1
    assert count == expected["tokens"]
    assert abs(total / count - expected["loss"]) < 1e-4, (total / count, expected["loss"])
