"""The engine on its own: batched decoding gives each sequence exactly what lm's single-sequence loop gives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.chat import render_chat
from app.engine import Engine, EngineOptions, Failed, Finished, Sequence, Token
from app.metrics import Metrics
from app.schemas import ChatMessage
from lm.registry import Registry
from lm.sampler import SamplingParams, SequenceSampler, prompt_ids, stream_generate
from tests.app.conftest import MODEL_A

pytestmark = pytest.mark.anyio

PROMPTS = ["To be", "Shall I compare", "", "Or to take arms against a sea", "x"]


def _params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=25 + 7 * i, temperature=0.9, top_k=10 * i, seed=100 + i)


async def _run(engine: Engine, prompts: list[str], params: list[SamplingParams]) -> list[tuple[str, str]]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tokenizer = engine.tokenizer
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        ids = prompt_ids(tokenizer, prompt)
        engine.submit(Sequence(ids, SequenceSampler(tokenizer, p, ids), loop, queue, index=i))
    texts = [""] * len(prompts)
    reasons: dict[int, str] = {}
    while len(reasons) < len(prompts):
        index, event = await asyncio.wait_for(queue.get(), 10)
        assert not isinstance(event, Failed), event
        if isinstance(event, Token):
            texts[index] += event.text
        elif isinstance(event, Finished):
            reasons[index] = event.finish_reason
    return [(texts[i], reasons[i]) for i in range(len(prompts))]


@pytest.fixture(params=[False, True], ids=["inline-prefill", "prefill-thread"])
def engine(models_dir: Path, request: pytest.FixtureRequest):
    """The plain engine, with prompts run between decode steps or on its prefill thread."""
    yield from _engine(models_dir, prefill_thread=request.param)


@pytest.fixture
def threaded_engine(models_dir: Path):
    yield from _engine(models_dir, prefill_thread=True)


def _engine(models_dir: Path, *, prefill_thread: bool):
    import torch

    checkpoint = Registry(models_dir).load(MODEL_A)
    engine = Engine(
        checkpoint.model,
        checkpoint.tokenizer,
        model_id=MODEL_A,
        max_running=3,  # fewer slots than sequences: some wait, then join a running batch
        device=torch.device("cpu"),
        metrics=Metrics(),
        options=EngineOptions(prefill_thread=prefill_thread),
    )
    engine.start()
    yield engine
    engine.stop()
    engine.join(5)
    assert not engine.alive


async def test_batched_decoding_equals_single_sequence_generation(engine: Engine) -> None:
    params = [_params(i) for i in range(len(PROMPTS))]
    batched = await _run(engine, PROMPTS, params)
    for (text, reason), prompt, p in zip(batched, PROMPTS, params, strict=True):
        single = stream_generate(engine.model, engine.tokenizer, prompt, p)
        assert text == "".join(single)
        assert reason == single.finish_reason
    samples = {s.name: s.value for m in engine.metrics.registry.collect() for s in m.samples}
    assert samples["textgen_running_sequences"] == 0
    assert samples["textgen_waiting_sequences"] == 0
    assert samples["textgen_batch_size_sum"] > samples["textgen_batch_size_count"]  # real batches happened


async def test_a_cancelled_sequence_leaves_and_frees_its_slot(engine: Engine) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tokenizer = engine.tokenizer
    ids = prompt_ids(tokenizer, "To be")
    long = Sequence(ids, SequenceSampler(tokenizer, SamplingParams(max_tokens=10**9, seed=1), ids), loop, queue)
    engine.submit(long)
    await asyncio.wait_for(queue.get(), 10)  # it runs
    long.cancel()
    for _ in range(200):
        if long.done and engine.states.available == 3:
            break
        await asyncio.sleep(0.01)
    assert long.done and engine.states.available == 3
    # the freed slots serve new work
    assert await _run(engine, ["a"], [SamplingParams(max_tokens=3, seed=0)]) == [
        ("".join(stream_generate(engine.model, tokenizer, "a", SamplingParams(max_tokens=3, seed=0))), "length")
    ]


def test_render_chat() -> None:
    template = {"system": "S: ", "user": "Q: ", "assistant": "A: ", "separator": "\n", "stop": ["\nQ:"]}
    messages = [
        ChatMessage(role="developer", content="Be brief."),
        ChatMessage(role="user", content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]),
        ChatMessage(role="assistant", content="Hello."),
        ChatMessage(role="user", content="Bye"),
    ]
    prompt, stop = render_chat(template, messages)
    assert prompt == "S: Be brief.\nQ: Hi there\nA: Hello.\nQ: Bye\nA: "
    assert stop == ["\nQ:"]
    default_prompt, default_stop = render_chat(None, [ChatMessage(role="user", content="Hi")])
    assert default_prompt == "User: Hi\nAssistant: "
    assert default_stop == ["\nUser:"]


async def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the next decode step raises, as a bug in a step would.
    real_decode = engine._decode
    calls = {"n": 0}

    def decode_once_broken() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        real_decode()

    monkeypatch.setattr(engine, "_decode", decode_once_broken)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(engine.tokenizer, "To be")
    engine.submit(Sequence(ids, SequenceSampler(engine.tokenizer, _params(1), ids), loop, queue, index=0))
    events = []
    while not events or not isinstance(events[-1], Failed | Finished):
        events.append((await asyncio.wait_for(queue.get(), 10))[1])
    assert isinstance(events[-1], Failed) and events[-1].retryable
    assert engine.alive
    # The engine thread survived: the next request is served in full.
    [(text, reason)] = await _run(engine, ["To be"], [_params(1)])
    assert reason == "length" and text == "".join(stream_generate(engine.model, engine.tokenizer, "To be", _params(1)))
    samples = {s.name: s.value for m in engine.metrics.registry.collect() for s in m.samples}
    assert samples["textgen_running_sequences"] == 0


def _held_prefill(engine: Engine, monkeypatch: pytest.MonkeyPatch, held_prompt: list[int]):
    """Prefill batches that contain `held_prompt` wait on the returned event before they run."""
    import threading

    release = threading.Event()
    real_prefill = engine._run_prefill

    def held(rows: list[Sequence], budget: int) -> None:
        if any(seq.prompt_ids == held_prompt for seq in rows):
            assert release.wait(10), "the test never released the prefill batch"
        real_prefill(rows, budget)

    monkeypatch.setattr(engine, "_run_prefill", held)
    return release


async def test_running_streams_keep_decoding_while_a_prompt_is_prefilled(
    threaded_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts run on the engine's prefill thread: a stream already running gets its tokens while a
    newcomer's prefill is still in progress, and the newcomer then gets exactly its own text."""
    engine = threaded_engine
    loop = asyncio.get_running_loop()
    tokenizer = engine.tokenizer
    newcomer = prompt_ids(tokenizer, "Or to take arms against a sea of troubles")
    release = _held_prefill(engine, monkeypatch, newcomer)
    running_queue: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(tokenizer, "To be")
    running = Sequence(
        ids, SequenceSampler(tokenizer, SamplingParams(max_tokens=10**9, seed=1), ids), loop, running_queue
    )
    engine.submit(running)
    await asyncio.wait_for(running_queue.get(), 10)  # it runs
    new_queue: asyncio.Queue = asyncio.Queue()
    engine.submit(Sequence(newcomer, SequenceSampler(tokenizer, _params(2), newcomer), loop, new_queue))
    for _ in range(20):  # the newcomer's prefill is held, and the running stream still advances
        _, event = await asyncio.wait_for(running_queue.get(), 10)
        assert isinstance(event, Token)
    assert new_queue.empty()
    release.set()
    text = ""
    while True:
        _, event = await asyncio.wait_for(new_queue.get(), 10)
        assert not isinstance(event, Failed), event
        if isinstance(event, Finished):
            break
        text += event.text
    prompt = "Or to take arms against a sea of troubles"
    assert text == "".join(stream_generate(engine.model, tokenizer, prompt, _params(2)))
    running.cancel()


async def test_a_failing_prefill_fails_its_requests_and_the_engine_keeps_serving(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_prefill = engine._run_prefill
    calls = {"n": 0}

    def once_broken(rows: list[Sequence], budget: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        real_prefill(rows, budget)

    monkeypatch.setattr(engine, "_run_prefill", once_broken)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(engine.tokenizer, "To be")
    engine.submit(Sequence(ids, SequenceSampler(engine.tokenizer, _params(1), ids), loop, queue, index=0))
    _, event = await asyncio.wait_for(queue.get(), 10)
    assert isinstance(event, Failed) and "failed on the server" in event.message
    [(text, reason)] = await _run(engine, ["To be"], [_params(1)])
    assert reason == "length" and text == "".join(stream_generate(engine.model, engine.tokenizer, "To be", _params(1)))
    samples = {s.name: s.value for m in engine.metrics.registry.collect() for s in m.samples}
    assert samples["textgen_waiting_sequences"] == 0 and samples["textgen_running_sequences"] == 0


async def test_stopping_during_a_prefill_fails_the_prompt_as_retryable(
    threaded_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = threaded_engine
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(engine.tokenizer, "To be")
    release = _held_prefill(engine, monkeypatch, ids)
    engine.submit(Sequence(ids, SequenceSampler(engine.tokenizer, _params(1), ids), loop, queue))
    await asyncio.sleep(0.2)  # the job is held in the prefill thread
    engine.stop()
    release.set()
    _, event = await asyncio.wait_for(queue.get(), 10)
    assert isinstance(event, Failed) and event.retryable and "unloaded" in event.message
    engine.join(5)
    assert not engine.alive
