"""The engine's speed features, as a client sees them: stream coalescing, the prompt-state cache, the fast steps."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.engine import Engine, EngineOptions, Failed, Finished, Sequence, Token
from app.metrics import Metrics
from app.prompt_cache import PromptCache
from lm.registry import Registry
from lm.sampler import SamplingParams, SequenceSampler, prompt_ids
from tests.app.conftest import MODEL_A, ClientFactory

pytestmark = pytest.mark.anyio

# a 60-character prompt: longer than the cache's 32-token minimum
PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely"


@pytest.fixture
def make_engine(models_dir: Path) -> Iterator:
    engines: list[Engine] = []

    def make(**options: object) -> Engine:
        checkpoint = Registry(models_dir).load(MODEL_A)
        engine = Engine(
            checkpoint.model,
            checkpoint.tokenizer,
            model_id=MODEL_A,
            max_running=4,
            device=torch.device("cpu"),
            metrics=Metrics(),
            options=EngineOptions(**options),  # type: ignore[arg-type]
        )
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
        engine.join(5)


async def _events(engine: Engine, prompt: str, params: SamplingParams) -> list[tuple[float, Token | Finished]]:
    """Submit one sequence; every event with the loop time it arrived at."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(engine.tokenizer, prompt)
    engine.submit(Sequence(ids, SequenceSampler(engine.tokenizer, params, ids), loop, queue))
    events: list[tuple[float, Token | Finished]] = []
    while not events or not isinstance(events[-1][1], Finished):
        _, event = await asyncio.wait_for(queue.get(), 10)
        assert not isinstance(event, Failed), event
        events.append((loop.time(), event))
    return events


def _text(events: list) -> str:
    return "".join(e.text for _, e in events if isinstance(e, Token))


def _sample(engine: Engine, name: str) -> float:
    return next(s.value for m in engine.metrics.registry.collect() for s in m.samples if s.name == name)


# ---------------------------------------------------------------------------- coalescing


async def test_interval_zero_sends_one_event_per_token(make_engine) -> None:
    engine = make_engine(stream_interval_s=0.0)
    events = await _events(engine, "To be", SamplingParams(max_tokens=40, seed=1))
    tokens = [e for _, e in events if isinstance(e, Token)]
    assert len(tokens) == 40 == events[-1][1].usage["completion_tokens"]


async def test_coalesced_stream_sends_the_first_token_at_once_and_the_same_text(make_engine) -> None:
    params = SamplingParams(max_tokens=300, seed=2)
    plain = await _events(make_engine(stream_interval_s=0.0), "To be", params)
    engine = make_engine(stream_interval_s=30.0)  # longer than the whole generation
    events = await _events(engine, "To be", params)
    tokens = [(t, e) for t, e in events if isinstance(e, Token)]
    # the first token alone, at once; everything else held until the end, in one event
    assert len(tokens) == 2
    assert len(tokens[0][1].text) == 1 and tokens[0][1].text == _text(plain)[0]
    assert _text(events) == _text(plain)
    assert _sample(engine, "textgen_time_to_first_token_seconds_sum") < 5  # not held back by the 30 s interval


async def test_a_short_interval_coalesces_a_fast_stream_into_fewer_events(make_engine) -> None:
    engine = make_engine(stream_interval_s=0.005)
    events = await _events(engine, "To be", SamplingParams(max_tokens=400, seed=3))
    tokens = [e for _, e in events if isinstance(e, Token)]
    assert 2 <= len(tokens) < 400
    assert len(_text(events)) == 400  # char model: one character per token, nothing lost


# ---------------------------------------------------------------------------- prompt-state cache


async def test_an_extended_prompt_runs_from_the_cached_prefix_with_the_same_text(make_engine) -> None:
    params = SamplingParams(max_tokens=60, temperature=0.9, seed=7)
    longer = PROMPT + " and more temperate"
    uncached = _text(await _events(make_engine(), longer, params))

    engine = make_engine(prompt_cache_bytes=1 << 20)
    await _events(engine, PROMPT, params)
    assert _sample(engine, "textgen_prompt_cache_hits_total") == 0
    assert _sample(engine, "textgen_prompt_cache_misses_total") == 1
    cached = _text(await _events(engine, longer, params))
    assert _sample(engine, "textgen_prompt_cache_hits_total") == 1
    assert _sample(engine, "textgen_prompt_cache_tokens_total") == len(PROMPT)  # char model: a token per char
    assert cached == uncached


async def test_a_repeated_prompt_needs_no_prefill_and_gives_the_same_text(make_engine) -> None:
    params = SamplingParams(max_tokens=50, temperature=1.0, seed=11)
    engine = make_engine(prompt_cache_bytes=1 << 20)
    first = _text(await _events(engine, PROMPT, params))
    again = _text(await _events(engine, PROMPT, params))
    assert again == first
    assert _sample(engine, "textgen_prompt_cache_tokens_total") == len(PROMPT)


async def test_a_next_turn_reuses_the_state_after_the_reply(make_engine) -> None:
    """prompt + reply + new text: only the new text (and the reply's last token) is run."""
    engine = make_engine(prompt_cache_bytes=1 << 20, decode="int8")
    reply = _text(await _events(engine, PROMPT, SamplingParams(max_tokens=30, seed=5)))
    assert len(reply) == 30
    await _events(engine, PROMPT + reply + "\nUser: and then?", SamplingParams(max_tokens=10, seed=5))
    assert _sample(engine, "textgen_prompt_cache_tokens_total") == len(PROMPT) + 29  # the last token was never fed


async def test_int8_next_turn_from_the_cached_reply_gives_the_uncached_text(make_engine) -> None:
    """The reply's state comes from decode steps, the uncached prompt's from prefill: in int8 they are the same."""
    engine = make_engine(prompt_cache_bytes=1 << 20, decode="int8")
    reply = _text(await _events(engine, PROMPT, SamplingParams(max_tokens=30, seed=5)))
    turn = PROMPT + reply + "\nUser: and then?"
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=9)
    cached = _text(await _events(engine, turn, params))
    assert _sample(engine, "textgen_prompt_cache_tokens_total") == len(PROMPT) + 29
    uncached = _text(await _events(make_engine(decode="int8"), turn, params))
    assert cached == uncached


async def test_a_small_budget_evicts_the_oldest_states(make_engine) -> None:
    engine = make_engine(prompt_cache_bytes=1500)  # room for one entry of the 16-unit model (about 1.1 KB)
    for prompt in (PROMPT, PROMPT.upper()):
        await _events(engine, prompt, SamplingParams(max_tokens=1, seed=1))
    await _events(engine, PROMPT, SamplingParams(max_tokens=1, seed=1))
    assert _sample(engine, "textgen_prompt_cache_hits_total") == 0
    assert 0 < _sample(engine, "textgen_prompt_cache_bytes") <= 1500


# ---------------------------------------------------------------------------- through the service


async def test_the_service_reports_cache_hits_in_metrics(make_client: ClientFactory) -> None:
    client: httpx.AsyncClient = await make_client(prompt_cache_mb=1, stream_interval_ms=5)
    body = {"prompt": PROMPT, "max_tokens": 20, "seed": 3}
    first = (await client.post("/generate", json=body)).json()
    second = (await client.post("/generate", json={**body, "prompt": PROMPT + first["text"] + " more"})).json()
    assert second["usage"]["prompt_tokens"] == len(PROMPT) + 20 + 5
    metrics = (await client.get("/metrics")).text
    assert "textgen_prompt_cache_hits_total 1.0" in metrics
    assert "textgen_prompt_cache_misses_total 1.0" in metrics
    assert f"textgen_prompt_cache_tokens_total {float(len(PROMPT) + 19)}" in metrics


@pytest.mark.parametrize("decode", ["reference", "fused", "int8"])
async def test_every_decode_kind_streams_over_sse(make_client: ClientFactory, decode: str) -> None:
    client: httpx.AsyncClient = await make_client(decode=decode, stream_interval_ms=0)
    body = {"prompt": "To be", "max_tokens": 25, "seed": 4, "stream": True}
    async with client.stream("POST", "/generate", json=body) as response:
        lines = [line async for line in response.aiter_lines()]
    assert lines.count("event: token") == 25
    assert lines.count("event: done") == 1


async def test_native_and_python_loops_give_the_same_seeded_text(make_client: ClientFactory) -> None:
    """TEXTGEN_NATIVE only moves the int8 step's loops between C++ and Python: the same text either way,
    for prompts that arrive together (a batched prefill job of 16 positions, after which the longer
    prompt goes on alone from its row of the job's state) as for prompts that arrive alone."""
    texts = []
    for native in (True, False):
        client: httpx.AsyncClient = await make_client(decode="int8", native=native, prefill_chunk=16)
        bodies = [{"prompt": PROMPT * k, "max_tokens": 40, "seed": 7 + k, "temperature": 0.9} for k in (1, 3)]
        together = await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))
        alone = [await client.post("/generate", json=body) for body in bodies]
        texts.append([response.json()["text"] for response in [*together, *alone]])
    assert texts[0] == texts[1] and all(len(text) > 0 for text in texts[0])
    assert texts[0][:2] == texts[0][2:]  # and the same as each prompt alone


@pytest.mark.parametrize(
    ("decode", "native", "loops"), [("int8", True, "C++"), ("int8", False, "Python"), ("fused", True, "Python")]
)
async def test_metrics_say_which_decode_step_runs(
    make_client: ClientFactory, decode: str, native: bool, loops: str
) -> None:
    client: httpx.AsyncClient = await make_client(decode=decode, native=native)
    assert (await client.post("/generate", json={"prompt": "To be", "max_tokens": 2})).status_code == 200
    metrics = (await client.get("/metrics")).text
    [info] = [line for line in metrics.splitlines() if line.startswith("textgen_decode_step_info{")]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    assert (labels["kind"], labels["loops"]) == (decode, loops) and info.endswith(" 1.0")


def test_the_cache_returns_the_longest_cached_prefix_and_copies_what_it_keeps() -> None:
    cache = PromptCache(1 << 20, layers=2, hidden=4, vocab=5, min_tokens=3)
    ids = list(range(10))
    h, c, logits = torch.ones(2, 4), torch.zeros(2, 4), torch.arange(5.0)
    for n in (3, 6, 8):
        cache.put(ids[:n], h * n, c, logits)
    h.fill_(-1)  # the cache kept copies
    assert cache.lookup(ids[:7]).length == 6  # type: ignore[union-attr]
    best = cache.lookup(ids + [99])
    assert best is not None and best.length == 8 and torch.equal(best.h, torch.full((2, 4), 8.0))
    assert cache.lookup([0, 1, 9, 9]) is None  # shares only two ids with every entry
    assert cache.lookup([0, 1]) is None  # shorter than min_tokens


async def test_a_loaded_model_shows_the_decode_step_its_engine_measured_and_chose(make_client: ClientFactory) -> None:
    client: httpx.AsyncClient = await make_client(threads=None)  # nothing pinned but what the cores allow
    plan = (await client.get(f"/models/{MODEL_A}")).json()["decode"]
    assert plan["kind"] in ("int8", "fused") and plan["source"] in ("measured", "cached") and plan["cpu"]
    assert plan["parity"]["reference"] == 0.0 and plan["parity"][plan["kind"]] < 0.25
    chosen = f"{plan['kind']}/{'vnni' if plan['vnni_rows'] else plan['product']}/{plan['threads']}t"
    assert plan["tokens_per_s"][chosen]["1"] > 0
    metrics = (await client.get("/metrics")).text
    assert 'textgen_decode_step_tokens_per_second{batch="1"}' in metrics
    assert f'kind="{plan["kind"]}"' in metrics and f'source="{plan["source"]}"' in metrics
    assert (await client.get("/models/tiny-b")).json()["decode"] is None  # not loaded: nothing measured


async def test_a_pinned_decode_step_is_served_as_pinned(make_client: ClientFactory) -> None:
    client: httpx.AsyncClient = await make_client(decode="fused", threads=1)
    plan = (await client.get(f"/models/{MODEL_A}")).json()["decode"]
    assert (plan["kind"], plan["threads"], plan["source"]) == ("fused", 1, "pinned")


# ---------------------------------------------------------------------------- decode chunks


CHUNK_REQUESTS = [
    ("To be", SamplingParams(max_tokens=90, temperature=0.8, top_k=8, seed=11)),
    ("Shall I", SamplingParams(max_tokens=61, temperature=1.2, top_p=0.9, min_p=0.02, seed=12)),
    ("O", SamplingParams(max_tokens=70, temperature=0.0)),  # greedy
    ("Thou", SamplingParams(max_tokens=80, temperature=0.9, stop=("e", "t"), seed=13)),  # stops inside a chunk
]


async def test_chunks_of_decode_steps_give_the_tokens_of_one_step_at_a_time(make_engine) -> None:
    """With nothing waiting, the engine runs several steps per native call (multi-step scheduling): the
    same text and finish for every request, alone and together, as an engine that runs one at a time."""
    one = make_engine(decode="int8", decode_chunk_s=0.0, stream_interval_s=0.0)
    chunked = make_engine(decode="int8", decode_chunk_s=0.05, stream_interval_s=0.0)
    one.ready.wait()
    chunked.ready.wait()
    assert chunked.plan.loops == "C++", "needs the native module"
    calls = {"n": 0}
    real = chunked.step.decode  # type: ignore[union-attr]

    def counting(*args: object) -> object:
        calls["n"] += 1
        return real(*args)

    chunked.step.decode = counting  # type: ignore[union-attr]
    for engine_pair in [(one, chunked)]:
        alone = [[_text(await _events(e, p, params)) for p, params in CHUNK_REQUESTS] for e in engine_pair]
        assert alone[0] == alone[1] and all(alone[0])
        together = [await asyncio.gather(*(_events(e, p, params) for p, params in CHUNK_REQUESTS)) for e in engine_pair]
        texts = [[_text(events) for events in run] for run in together]
        finishes = [[run_events[-1][1].finish_reason for run_events in run] for run in together]
        assert texts[0] == texts[1] == alone[0] and finishes[0] == finishes[1]
        assert "stop" in finishes[0]
    assert calls["n"] > 0, "the chunked engine never ran a chunk"
