"""choose_batch gives, row by row, the ids SequenceSampler.choose gives for the same seeds and params."""

from __future__ import annotations

import pytest
import torch

from lm.batch_sampler import choose_batch
from lm.sampler import SamplingParams, SequenceSampler
from lm.tokenizers import CharTokenizer

PARAMS = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.0, seed=2),  # greedy
    SamplingParams(temperature=0.7, top_k=5, seed=3),
    SamplingParams(temperature=1.3, top_p=0.9, seed=4),
    SamplingParams(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05, seed=5),
    SamplingParams(temperature=1.0, min_p=0.2, seed=6),
    SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5, seed=7),  # the per-row path
    SamplingParams(temperature=2.5, top_k=1000, top_p=0.999, seed=8),  # top_k above V: off
]


def _samplers(tokenizer: CharTokenizer, params: list[SamplingParams]) -> list[SequenceSampler]:
    return [SequenceSampler(tokenizer, p, [1, 2, 3]) for p in params]


@pytest.mark.parametrize("native_draws", [True, False], ids=["native", "python"])
@pytest.mark.parametrize(
    "rows", [PARAMS, PARAMS[:1], [PARAMS[2]] * 4, [PARAMS[3]] * 5, [PARAMS[4]] * 3, [PARAMS[1]] * 3]
)
def test_batch_draws_equal_row_by_row_draws(
    char_tokenizer: CharTokenizer, rows: list[SamplingParams], native_draws: bool
) -> None:
    """Both with the draws in one native call (lm/kernels/native.py) and with the Python loop over rows."""
    batched, single = _samplers(char_tokenizer, rows), _samplers(char_tokenizer, rows)
    gen = torch.Generator().manual_seed(0)
    V = char_tokenizer.vocab_size
    for step in range(60):
        logits = torch.randn(len(rows), V, generator=gen) * (1 + step % 4)  # (B, V), sharper every few steps
        got = choose_batch(batched, logits, native_draws=native_draws)
        want = [s.choose(row) for s, row in zip(single, logits, strict=True)]
        assert got == want, f"step {step}"
        for a, b, token in zip(batched, single, want, strict=True):
            a.push(token)
            b.push(token)


def test_a_batch_with_only_greedy_rows_is_argmax(char_tokenizer: CharTokenizer) -> None:
    samplers = _samplers(char_tokenizer, [SamplingParams(temperature=0.0)] * 4)
    logits = torch.randn(4, char_tokenizer.vocab_size)
    assert choose_batch(samplers, logits) == logits.argmax(dim=1).tolist()
