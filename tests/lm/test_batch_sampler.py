"""choose_batch gives, row by row, the ids SequenceSampler.choose gives for the same seeds and params."""

from __future__ import annotations

import pytest
import torch

from lm.batch_sampler import advance_constraints, choose_batch
from lm.constrain import Constraint, ConstraintCompiler
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


def test_constraints_advanced_together_give_the_tokens_and_ends_of_each_alone(char_tokenizer: CharTokenizer) -> None:
    """advance_constraints (the engine's path: every constrained row's next mask in one pass) leaves each
    sequence where advancing it alone would: the same tokens, text, and finish."""
    compiler = ConstraintCompiler(char_tokenizer)
    constraints = [
        compiler.compile(Constraint.regex("[a-e]{3,12}")),
        compiler.compile(Constraint.choice(["abc", "bad", "cab dab"])),
        compiler.compile(Constraint.regex("[a-z ]+")),  # open-ended: may be left by a refused token
        None,  # an unconstrained row beside them
    ]

    def make() -> list[SequenceSampler]:
        return [
            SequenceSampler(char_tokenizer, SamplingParams(temperature=1.2, seed=i, max_tokens=20), [1], constraint=c)
            for i, c in enumerate(constraints * 2)
        ]

    together, alone = make(), make()
    gen = torch.Generator().manual_seed(0)
    for step in range(25):
        logits = torch.randn(len(together), char_tokenizer.vocab_size, generator=gen)
        ids = choose_batch(together, logits)
        assert ids == choose_batch(alone, logits), f"step {step}"
        advance_constraints(together, ids)
        assert [a.push(t) for a, t in zip(together, ids, strict=True)] == [
            b.push(t) for b, t in zip(alone, ids, strict=True)
        ]
    assert [(s.finish_reason, s.refused, s.completion_tokens) for s in together] == [
        (s.finish_reason, s.refused, s.completion_tokens) for s in alone
    ]
    assert all(s.finished for s in together[:3])
