"""Sampling parameters at the edges of what validation accepts: never NaN probabilities, never a crash.

A tiny temperature, top_p or repetition penalty is valid input (the API's bounds are open or closed
at 0); each once made softmax produce NaN, which raised in the engine's thread.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm.batch_sampler import choose_batch
from lm.sampler import SamplingParams, SequenceSampler
from lm.tokenizers import fit_tokenizer

TOKENIZER = fit_tokenizer("char", "abcdefghij klmnop")
EDGES = [
    {"temperature": 1e-40},
    {"temperature": 5e-324},
    {"temperature": 1e-20, "top_k": 3},
    {"top_p": 1e-300},
    {"top_p": 5e-324, "temperature": 1e-30},
    {"min_p": 0.99999999},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e-300, "temperature": 1e-40},
    {"temperature": 5.0, "top_p": 1e-45, "min_p": 0.999999, "top_k": 1},
]


@pytest.mark.parametrize("params", EDGES)
@pytest.mark.parametrize("scale", [100.0, -100.0, 1e30])
def test_extreme_parameters_choose_a_token_alone_and_in_a_batch(params: dict[str, float], scale: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(TOKENIZER.vocab_size) * scale  # (V,)
    sampler = SequenceSampler(TOKENIZER, SamplingParams(seed=1, **params), [1, 2])
    alone = sampler.choose(logits)
    (batched,) = choose_batch([SequenceSampler(TOKENIZER, SamplingParams(seed=1, **params), [1, 2])], logits[None])
    assert 0 <= alone < TOKENIZER.vocab_size
    assert 0 <= batched < TOKENIZER.vocab_size
    value, top = sampler.logprobs(logits, alone, 3)
    assert math.isfinite(value) and all(math.isfinite(v) for v in top.values())
    json.dumps({"logprob": value, "top": top}, allow_nan=False)  # what an answer carries


@pytest.mark.parametrize("temperature", [1e-40, 1e-20, 1e-6])
def test_a_tiny_temperature_is_the_most_likely_token(temperature: float) -> None:
    torch.manual_seed(1)
    for _ in range(20):
        logits = torch.randn(TOKENIZER.vocab_size) * 5
        sampleable = logits.clone()
        sampleable[TOKENIZER.unk_id] = float("-inf")  # the unknown token is never sampled by default
        sampler = SequenceSampler(TOKENIZER, SamplingParams(temperature=temperature), [1])
        assert sampler.choose(logits) == int(sampleable.argmax())
        (batched,) = choose_batch(
            [SequenceSampler(TOKENIZER, SamplingParams(temperature=temperature), [1])], logits[None]
        )
        assert batched == int(sampleable.argmax())
