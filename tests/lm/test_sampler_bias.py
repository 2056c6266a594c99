"""The additive bias of each sequence: the special-token mask (the unknown token is never sampled by default)
and OpenAI's logit_bias, in SequenceSampler, in the batched sampler and in the single-sequence stream."""

from __future__ import annotations

import pytest
import torch

from lm.batch_sampler import batch_bias, choose_batch
from lm.errors import ConfigError
from lm.model import LSTMLanguageModel
from lm.sampler import SamplingParams, SequenceSampler, generate, special_mask
from lm.tokenizers import UNK_TEXT, CharTokenizer


def _sampler(tokenizer: CharTokenizer, **params: object) -> SequenceSampler:
    return SequenceSampler(tokenizer, SamplingParams(**params), [1, 2])  # type: ignore[arg-type]


def _unk_first(tokenizer: CharTokenizer, gen: torch.Generator) -> torch.Tensor:
    """Logits (V,) where the unknown token is by far the most likely."""
    logits = torch.randn(tokenizer.vocab_size, generator=gen)
    logits[tokenizer.unk_id] = 10.0
    return logits


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 5.0])
def test_the_unknown_token_is_never_sampled_by_default(char_tokenizer: CharTokenizer, temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for seed in range(50):
        logits = _unk_first(char_tokenizer, gen)
        assert _sampler(char_tokenizer, temperature=temperature, seed=seed).choose(logits) != char_tokenizer.unk_id
        rows = [_sampler(char_tokenizer, temperature=temperature, seed=seed) for _ in range(3)]
        assert char_tokenizer.unk_id not in choose_batch(rows, logits.expand(3, -1))


def test_skip_special_tokens_off_lets_the_model_sample_it(char_tokenizer: CharTokenizer) -> None:
    logits = _unk_first(char_tokenizer, torch.Generator().manual_seed(0))
    assert _sampler(char_tokenizer, temperature=0.0, skip_special_tokens=False).choose(logits) == char_tokenizer.unk_id
    drawn = [_sampler(char_tokenizer, seed=s, skip_special_tokens=False).choose(logits) for s in range(20)]
    assert drawn.count(char_tokenizer.unk_id) >= 15  # its probability is above 0.9 here


def test_the_reported_distribution_keeps_the_unknown_token(char_tokenizer: CharTokenizer) -> None:
    """logprobs() is the model's own softmax: the masked token keeps its probability (scoring needs it)."""
    logits = _unk_first(char_tokenizer, torch.Generator().manual_seed(0))
    sampler = _sampler(char_tokenizer, logit_bias={3: -100.0, 4: 100.0})
    value, top = sampler.logprobs(logits, char_tokenizer.unk_id, 2)
    assert value == pytest.approx(float(torch.log_softmax(logits, -1)[char_tokenizer.unk_id]))
    assert next(iter(top)) == UNK_TEXT  # still the most likely in what is reported


def test_one_mask_row_per_tokenizer_shared_by_default_rows(char_tokenizer: CharTokenizer) -> None:
    mask = special_mask(char_tokenizer)
    assert mask is not None and mask is special_mask(char_tokenizer)
    assert mask[char_tokenizer.unk_id] == float("-inf") and int((mask != 0).sum()) == 1
    rows = [_sampler(char_tokenizer, seed=s) for s in range(4)]
    assert all(r.bias is mask for r in rows)
    assert batch_bias(rows) is mask  # one broadcast add for the whole batch
    assert batch_bias([_sampler(char_tokenizer, skip_special_tokens=False) for _ in range(3)]) is None
    mixed = batch_bias([rows[0], _sampler(char_tokenizer, skip_special_tokens=False)])
    assert mixed is not None and mixed.shape == (2, char_tokenizer.vocab_size)
    assert torch.equal(mixed[1], torch.zeros(char_tokenizer.vocab_size))


def test_a_bias_of_minus_100_bans_a_token_and_plus_100_forces_one(char_tokenizer: CharTokenizer) -> None:
    gen = torch.Generator().manual_seed(1)
    for seed in range(100):
        logits = torch.randn(char_tokenizer.vocab_size, generator=gen) * 3
        top = int(logits[1:].argmax()) + 1  # id 0 is <unk>, masked anyway
        least = int(logits[1:].argmin()) + 1
        for temperature in (0.0, 1.0, 2.0):
            banned = _sampler(char_tokenizer, temperature=temperature, seed=seed, logit_bias={top: -100.0})
            assert banned.choose(logits) != top
            forced = _sampler(char_tokenizer, temperature=temperature, seed=seed, logit_bias={least: 100.0})
            assert forced.choose(logits) == least
        # the batched sampler, with rows of each kind side by side
        rows = [
            _sampler(char_tokenizer, seed=seed, logit_bias={top: -100.0}),
            _sampler(char_tokenizer, seed=seed, logit_bias={least: 100.0}),
            _sampler(char_tokenizer, seed=seed, temperature=0.0, logit_bias={least: 100.0}),
        ]
        picks = choose_batch(rows, logits.expand(3, -1))
        assert picks[0] != top and picks[1:] == [least, least]


@pytest.mark.parametrize("native_draws", [True, False], ids=["native", "python"])
def test_biased_batches_draw_what_each_row_draws_alone(char_tokenizer: CharTokenizer, native_draws: bool) -> None:
    V = char_tokenizer.vocab_size
    params = [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.9, seed=2, logit_bias={5: 3.5, 7: -2.0, 0: 50.0}),
        SamplingParams(temperature=1.2, seed=3, skip_special_tokens=False),
        SamplingParams(temperature=0.0, logit_bias={9: 1.5}),
        SamplingParams(temperature=0.8, top_k=6, top_p=0.9, seed=5, logit_bias={2: 4.0}, skip_special_tokens=False),
        SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=6, logit_bias={1: 2.0}),  # the per-row path
    ]
    batched = [SequenceSampler(char_tokenizer, p, [1, 2, 3]) for p in params]
    single = [SequenceSampler(char_tokenizer, p, [1, 2, 3]) for p in params]
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        logits = torch.randn(len(params), V, generator=gen) * (1 + step % 3)
        picks = choose_batch(batched, logits, native_draws=native_draws)
        assert picks == [s.choose(logits[i]) for i, s in enumerate(single)], f"step {step}"
        for a, b, token in zip(batched, single, picks, strict=True):
            a.push(token)
            b.push(token)


def test_logit_bias_is_checked(char_tokenizer: CharTokenizer) -> None:
    with pytest.raises(ConfigError, match=r"\[-100, 100\]") as bad:
        SamplingParams(logit_bias={3: 100.5}).validate()
    assert bad.value.param == "logit_bias"
    with pytest.raises(ConfigError, match="integer >= 0"):
        SamplingParams(logit_bias={-1: 1.0}).validate()
    with pytest.raises(ConfigError, match="at most 1024"):
        SamplingParams(logit_bias={i: 1.0 for i in range(1025)}).validate()
    with pytest.raises(
        ConfigError, match=f"token id 999 is outside the vocabulary \\(ids 0 to {char_tokenizer.vocab_size - 1}\\)"
    ):
        _sampler(char_tokenizer, logit_bias={999: 1.0})
    assert SamplingParams(logit_bias={4: 1, 2: -3.5}).logit_bias == ((2, -3.5), (4, 1))  # a dict, kept sorted


def test_a_vocabulary_of_only_the_unknown_token_is_not_masked_away() -> None:
    tokenizer = CharTokenizer(["<unk>"])
    assert tokenizer.vocab_size == 1 and special_mask(tokenizer) is None
    assert SequenceSampler(tokenizer, SamplingParams(seed=1), [0]).choose(torch.zeros(1)) == 0


def test_the_single_sequence_stream_masks_too(char_tokenizer: CharTokenizer, tiny_model: LSTMLanguageModel) -> None:
    """The CLI's path (TextStream): a model that always prefers <unk> never writes U+FFFD, unless asked."""
    with torch.no_grad():
        tiny_model.head.bias[char_tokenizer.unk_id] = 50.0
    text = generate(tiny_model, char_tokenizer, "to be", SamplingParams(max_tokens=30, temperature=0.8, seed=3))
    assert len(text) == 30 and UNK_TEXT not in text
    raw = SamplingParams(max_tokens=30, temperature=0.8, seed=3, skip_special_tokens=False)
    assert generate(tiny_model, char_tokenizer, "to be", raw) == UNK_TEXT * 30
