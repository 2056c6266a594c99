"""The int8 step's C++ loops (lm/kernels/csrc/int8_step.cpp) against the same step's Python loops: the same
bits for decode steps, batched steps and whole prompts, on every path (one row, packed rows, the
wavefront and its edges)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lm.decode import FusedStep, build_step
from lm.kernels import native
from lm.model import LSTMLanguageModel, ModelConfig
from lm.tokenizers import CharTokenizer

State = tuple[torch.Tensor, torch.Tensor]


def test_this_install_has_built_the_native_loops() -> None:
    """`make install` / `make dev` build them; without a build textgen would quietly run slower."""
    assert native.load() is not None, f"{native.module_path()} is missing: run `python -m lm.kernels.native build`"
    done = subprocess.run(
        [sys.executable, "-m", "lm.kernels.native", "check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and str(native.module_path()) in done.stdout, done.stderr


@pytest.fixture(params=[(16, 2), (48, 3), (18, 2)], ids=["16x2", "48x3", "18x2"])
def steps(request: pytest.FixtureRequest, char_tokenizer: CharTokenizer) -> tuple[FusedStep, FusedStep]:
    """The same int8 step twice, with C++ and with Python loops; sizes with and without a scalar tail, and
    (18) one whose rows and inputs the VNNI layout pads to its multiples of 16 and 4."""
    hidden, layers = request.param
    torch.manual_seed(5)
    cfg = ModelConfig(char_tokenizer.vocab_size, embedding_dim=12, hidden_dim=hidden, layers=layers, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    fast, slow = build_step(model, "int8"), build_step(model, "int8", native_loops=False)  # both FusedStep
    assert (fast.loops, slow.loops) == ("C++", "Python")
    return fast, slow


def _random_state(step: FusedStep, batch: int) -> State:
    h = torch.rand(step.layers, batch, step.hidden) * 2 - 1  # |h| <= 1, as every real h
    return h, torch.randn(step.layers, batch, step.hidden)


def _run_both(
    steps: tuple[FusedStep, FusedStep], method: str, tokens: torch.Tensor, batch: int, *, view: bool = False
) -> None:
    """Both loops from the same random state; `view`: the state is rows of a larger batch's state,
    as the engine's state rows and a prompt's state after a batched prefill job are."""
    fast, slow = steps
    h, c = _random_state(fast, batch)
    hf, cf, hs, cs = h.clone(), c.clone(), h.clone(), c.clone()
    if view:
        wide = [torch.zeros(fast.layers, batch + 3, fast.hidden) for _ in range(2)]
        wide[0][:, 1 : batch + 1], wide[1][:, 1 : batch + 1] = h, c
        hf, cf = wide[0][:, 1 : batch + 1], wide[1][:, 1 : batch + 1]
    out_fast = getattr(fast, method)(tokens, hf, cf)
    out_slow = getattr(slow, method)(tokens, hs, cs)
    assert out_fast is None or torch.equal(out_fast, out_slow), method
    assert torch.equal(hf, hs) and torch.equal(cf, cs), method
    assert not torch.equal(hf, h), "the state was updated in place"
    if view:  # and nothing outside its rows
        assert all(float(w[:, 0].abs().sum() + w[:, batch + 1 :].abs().sum()) == 0 for w in wide)


@pytest.mark.parametrize("view", [False, True], ids=["own", "view"])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_a_decode_step_is_the_same_bits(steps: tuple[FusedStep, FusedStep], batch: int, view: bool) -> None:
    tokens = torch.randint(0, steps[0].table.shape[0], (batch,))
    _run_both(steps, "__call__", tokens, batch, view=view)
    _run_both(steps, "advance", tokens, batch, view=view)


@pytest.mark.parametrize("view", [False, True], ids=["own", "view"])
@pytest.mark.parametrize("k", [1, 3])
def test_batched_steps_are_the_same_bits(steps: tuple[FusedStep, FusedStep], k: int, view: bool) -> None:
    ids = torch.randint(0, steps[0].table.shape[0], (k, 9))
    _run_both(steps, "steps", ids, k, view=view)


@pytest.mark.parametrize("view", [False, True], ids=["own", "view"])
@pytest.mark.parametrize("length", [1, 2, 3, 40])
def test_a_prompt_is_the_same_bits(steps: tuple[FusedStep, FusedStep], length: int, view: bool) -> None:
    """Lengths below the layer count run only the wavefront's edges; 40 runs its middle too. A view:
    the engine continues a long prompt alone from its row of a batched prefill job's state."""
    tokens = torch.randint(0, steps[0].table.shape[0], (length,))
    _run_both(steps, "prefill", tokens, 1, view=view)


def test_the_setting_turns_the_native_loops_off(char_tokenizer: CharTokenizer) -> None:
    cfg = ModelConfig(char_tokenizer.vocab_size, embedding_dim=8, hidden_dim=8, layers=1, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    assert build_step(model, "int8").loops == "C++"
    assert build_step(model, "int8", native_loops=False).loops == "Python"
    assert build_step(model, "fused").loops == "Python"  # fp32 has no native loops


VNNI = native.load() is not None and bool(native.load().Int8Step.vnni_available())
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI (the oneDNN products serve)")


def _vnni(steps: tuple[FusedStep, FusedStep], threads: int) -> tuple[FusedStep, FusedStep]:
    fast, slow = steps
    fast.set_plan(64, threads)  # type: ignore[attr-defined]  # a NativeInt8Step
    return fast, slow


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9])
def test_the_vnni_products_give_the_same_bits(steps: tuple[FusedStep, FusedStep], batch: int, threads: int) -> None:
    """textgen's VNNI products (one to four rows at a time, the output rows split over threads) give the
    integer sums oneDNN's give: the step's state and logits are the Python loops' to the bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        both = _vnni(steps, threads)
        tokens = torch.randint(0, both[0].table.shape[0], (batch,))
        _run_both(both, "__call__", tokens, batch, view=True)
        ids = torch.randint(0, both[0].table.shape[0], (batch, 5))
        _run_both(both, "steps", ids, batch)
    finally:
        torch.set_num_threads(before)


@needs_vnni
@pytest.mark.parametrize("length", [1, 2, 3, 40])
def test_a_prompt_through_the_vnni_products_is_the_same_bits(steps: tuple[FusedStep, FusedStep], length: int) -> None:
    both = _vnni(steps, 1)
    tokens = torch.randint(0, both[0].table.shape[0], (length,))
    _run_both(both, "prefill", tokens, 1, view=True)


def test_a_plan_cannot_ask_for_products_the_cpu_lacks(steps: tuple[FusedStep, FusedStep]) -> None:
    fast, _ = steps
    if VNNI:
        fast.set_plan(8, 1)  # type: ignore[attr-defined]
        assert fast.vnni_rows == 8  # type: ignore[attr-defined]
    else:
        with pytest.raises(RuntimeError, match="VNNI"):
            fast.set_plan(8, 1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("biases", ["shared", "mixed"])
@pytest.mark.parametrize("chunk", [1, 2, 9])
def test_a_chunk_of_steps_gives_the_tokens_states_and_draws_of_one_step_at_a_time(
    steps: tuple[FusedStep, FusedStep], char_tokenizer: CharTokenizer, chunk: int, biases: str
) -> None:
    """decode(n): n steps, each row's token chosen as choose_batch would and fed back, in one call; with
    every row's bias the tokenizer's shared special-token mask, or rows of their own (logit_bias, no mask)."""
    from lm.batch_sampler import choose_batch
    from lm.sampler import SamplingParams, SequenceSampler

    fast, _ = steps
    rows = [
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(temperature=0.0),  # greedy
        SamplingParams(temperature=1.1, top_p=0.9, min_p=0.05, seed=3),
        SamplingParams(temperature=0.7, seed=4),
    ]
    if biases == "mixed":
        rows += [
            SamplingParams(temperature=0.9, seed=5, logit_bias={2: 3.0, 5: -100.0, 7: 100.0}),
            SamplingParams(temperature=1.0, seed=6, skip_special_tokens=False),
            SamplingParams(temperature=0.0, logit_bias={3: 100.0}),  # greedy, forced
        ]
    chunked = [SequenceSampler(char_tokenizer, p, [1]) for p in rows]
    stepped = [SequenceSampler(char_tokenizer, p, [1]) for p in rows]
    h, c = _random_state(fast, len(rows))
    h2, c2 = h.clone(), c.clone()
    tokens = torch.randint(0, fast.table.shape[0], (len(rows),))
    ids, logits = fast.decode(tokens, h, c, chunk, chunked)  # type: ignore[attr-defined]
    current = tokens
    for t in range(chunk):
        step_logits = fast(current, h2, c2)
        chosen = choose_batch(stepped, step_logits)
        assert ids[:, t].tolist() == chosen, f"step {t}"
        current = torch.tensor(chosen)
    assert torch.equal(logits, step_logits) and torch.equal(h, h2) and torch.equal(c, c2)
