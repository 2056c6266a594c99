"""The sampler on a real tiny LSTM and a real char tokenizer: what a caller of generate() sees."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lm.errors import ConfigError
from lm.model import LSTMLanguageModel, ModelConfig, State
from lm.sampler import SamplingParams, SequenceSampler, generate, stream_generate
from lm.tokenizers import Tokenizer, fit_tokenizer

CORPUS = "the quick brown fox jumps over the lazy dog.\nhello world, goodbye world!\nPACK MY BOX WITH FIVE JUGS.\n"


class CountingLSTM(LSTMLanguageModel):
    """The real model, recording the shape of every forward call and whether a state came in."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.calls: list[tuple[tuple[int, ...], bool]] = []
        self.modes: list[bool] = []  # self.training at each call

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        self.calls.append((tuple(ids.shape), state is not None))
        self.modes.append(self.training)
        return super().forward(ids, state)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return fit_tokenizer("char", CORPUS)


@pytest.fixture
def model(tok: Tokenizer) -> CountingLSTM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=16, hidden_dim=16, layers=1, dropout=0.0)
    return CountingLSTM(cfg).eval()


def logits_for(tok: Tokenizer, values: dict[int, float]) -> Tensor:
    """(V,) logits: the given ids get the given values, every other id is impossible."""
    x = torch.full((tok.vocab_size,), float("-inf"))
    for token_id, value in values.items():
        x[token_id] = value
    return x


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text)


# -- determinism and seeds ------------------------------------------------------------------------


def test_greedy_is_deterministic_whatever_the_seed(model, tok):
    a = generate(model, tok, "the ", SamplingParams(max_tokens=30, temperature=0, seed=1))
    b = generate(model, tok, "the ", SamplingParams(max_tokens=30, temperature=0, seed=2))
    assert a == b
    assert len(a) == 30  # char tokenizer: one character per token


def test_top_k_1_equals_greedy(model, tok):
    greedy = generate(model, tok, "hello", SamplingParams(max_tokens=25, temperature=0))
    top1 = generate(model, tok, "hello", SamplingParams(max_tokens=25, temperature=1.5, top_k=1, seed=7))
    assert top1 == greedy


def test_same_seed_gives_same_text_and_different_seeds_differ(model, tok):
    # a freshly initialized model has spread (near-uniform) logits, so seeds matter
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=123)
    first = generate(model, tok, "the ", params)
    again = generate(model, tok, "the ", params)
    other = generate(model, tok, "the ", SamplingParams(max_tokens=40, temperature=1.0, seed=124))
    assert first == again
    assert first != other


def test_unseeded_generations_differ(model, tok):
    params = SamplingParams(max_tokens=40, temperature=1.0)
    assert generate(model, tok, "the ", params) != generate(model, tok, "the ", params)


def test_generation_matches_refeeding_the_whole_sequence(model, tok):
    """The carried LSTM state gives the same greedy text as re-running the full sequence every step."""
    prompt = "quick "
    text = generate(model, tok, prompt, SamplingParams(max_tokens=15, temperature=0))
    ids = tok.encode(prompt)
    with torch.inference_mode():
        for _ in range(15):
            logits, _ = model(torch.tensor([ids]))  # (1, T, V)
            ids.append(int(logits[0, -1].argmax()))
    assert text == tok.decode(ids[len(tok.encode(prompt)) :])


# -- one forward call for the prompt, one token per step ------------------------------------------


def test_prompt_fed_once_then_one_token_per_step(model, tok):
    prompt = "hello world"
    gen = stream_generate(model, tok, prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=3))
    pieces = list(gen)
    assert len(pieces) == 12
    assert model.calls[0] == ((1, len(tok.encode(prompt))), False)
    # the 12th token is sampled from the 11th step's logits and never fed back
    assert model.calls[1:] == [((1, 1), True)] * 11


def test_empty_prompt_starts_from_newline(model, tok):
    gen = stream_generate(model, tok, "", SamplingParams(max_tokens=5, temperature=0))
    assert len("".join(gen)) == 5
    assert model.calls[0] == ((1, len(tok.encode("\n"))), False)
    assert gen.usage == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}


def test_generation_runs_in_eval_mode_and_restores_training_mode(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embedding_dim=16, hidden_dim=16, layers=2, dropout=0.5)
    model = CountingLSTM(cfg).train()
    generate(model, tok, "the ", SamplingParams(max_tokens=5, seed=5))
    assert model.modes == [False] * 5  # dropout off while generating
    assert model.training


# -- finishing: length and stop strings -----------------------------------------------------------


def test_max_tokens_finishes_with_length(model, tok):
    gen = stream_generate(model, tok, "the ", SamplingParams(max_tokens=7, seed=0))
    assert gen.finish_reason is None
    text = "".join(gen)
    assert len(text) == 7
    assert gen.finish_reason == "length"
    assert gen.usage == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


def test_stop_string_ends_generation_and_is_not_returned(model, tok):
    full = generate(model, tok, "the ", SamplingParams(max_tokens=40, temperature=0))
    stop = full[12:15]  # three characters: a stop string split across three tokens
    cut = full.index(stop)
    gen = stream_generate(model, tok, "the ", SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    text = "".join(gen)
    assert text == full[:cut]
    assert gen.finish_reason == "stop"
    assert gen.usage["completion_tokens"] == cut + len(stop)


def test_push_holds_back_a_possible_stop_string_and_releases_it_when_it_is_not(tok):
    sampler = SequenceSampler(tok, SamplingParams(stop=("world",)), tok.encode("x"))
    out = [sampler.push(i) for i in ids_of(tok, "hello wor")]
    assert "".join(out) == "hello "  # "wor" could still become "world"
    assert sampler.push(ids_of(tok, "k")[0]) == "work"  # it did not
    out = [sampler.push(i) for i in ids_of(tok, "s, world! bye")]
    assert "".join(out) == "s, "
    assert sampler.finished and sampler.finish_reason == "stop"
    assert sampler.flush() == ""
    assert sampler.push(ids_of(tok, "a")[0]) == ""  # nothing after a finish


def test_earliest_of_several_stop_strings_wins(tok):
    sampler = SequenceSampler(tok, SamplingParams(stop=("dog", "lazy")), tok.encode("x"))
    text = "".join(sampler.push(i) for i in ids_of(tok, "over the lazy dog"))
    assert text == "over the "
    assert sampler.finish_reason == "stop"


def test_length_finish_flushes_held_back_text(tok):
    sampler = SequenceSampler(tok, SamplingParams(max_tokens=3, stop=("box",)), tok.encode("x"))
    assert [sampler.push(i) for i in ids_of(tok, "abo")] == ["a", "", ""]
    assert sampler.finished and sampler.finish_reason == "length"
    assert sampler.flush() == "bo"
    assert sampler.flush() == ""


# -- logits processors ----------------------------------------------------------------------------


def test_repetition_penalty_applies_to_prompt_tokens_of_either_sign(tok):
    a, b = ids_of(tok, "ab")
    params = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert SequenceSampler(tok, params, [a]).choose(logits_for(tok, {a: 2.0, b: 1.0})) == b  # 2 / 4 < 1
    assert SequenceSampler(tok, params, [a]).choose(logits_for(tok, {a: -1.0, b: -3.0})) == b  # -1 * 4 < -3
    assert SequenceSampler(tok, params, [b]).choose(logits_for(tok, {a: 2.0, b: 1.0})) == a


def test_frequency_and_presence_penalties_count_completion_tokens_only(tok):
    a, b = ids_of(tok, "ab")
    logits = logits_for(tok, {a: 2.0, b: 1.5})
    sampler = SequenceSampler(tok, SamplingParams(temperature=0, frequency_penalty=1.0), [a, a, a])
    assert sampler.choose(logits) == a  # prompt tokens do not count
    sampler.push(a)
    assert sampler.choose(logits) == b  # 2 - 1 < 1.5
    presence = SequenceSampler(tok, SamplingParams(temperature=0, presence_penalty=0.6), [])
    presence.push(a)
    presence.push(a)
    assert presence.choose(logits) == b  # 2 - 0.6 < 1.5, whatever the count


def test_penalties_change_what_the_model_generates(model, tok):
    plain = generate(model, tok, "the ", SamplingParams(max_tokens=20, temperature=0))
    assert len(set(plain)) < 20  # a tiny untrained model repeats itself
    # a penalty of 4 per seen token is larger than this model's logit spread: no character twice
    params = SamplingParams(max_tokens=20, temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    assert len(set(generate(model, tok, "the ", params))) == 20
    repeated = generate(model, tok, "the ", SamplingParams(max_tokens=20, temperature=0, repetition_penalty=10.0))
    assert repeated != plain


def test_top_p_keeps_the_smallest_nucleus(tok):
    a, b, c = ids_of(tok, "abc")
    logits = logits_for(tok, {a: math.log(0.5), b: math.log(0.3), c: math.log(0.2)})
    only_a = SequenceSampler(tok, SamplingParams(top_p=0.5, seed=0), [])
    assert {only_a.choose(logits) for _ in range(50)} == {a}
    a_or_b = SequenceSampler(tok, SamplingParams(top_p=0.6, seed=0), [])
    assert {a_or_b.choose(logits) for _ in range(200)} == {a, b}


def test_min_p_drops_tokens_below_a_share_of_the_top_one(tok):
    a, b, c = ids_of(tok, "abc")
    logits = logits_for(tok, {a: math.log(0.5), b: math.log(0.3), c: math.log(0.2)})
    sampler = SequenceSampler(tok, SamplingParams(min_p=0.5, seed=0), [])  # threshold 0.25
    assert {sampler.choose(logits) for _ in range(200)} == {a, b}
    everything = SequenceSampler(tok, SamplingParams(seed=0), [])
    assert {everything.choose(logits) for _ in range(200)} == {a, b, c}


def test_temperature_sharpens_or_flattens_the_distribution(tok):
    a, b = ids_of(tok, "ab")
    logits = logits_for(tok, {a: 1.0, b: 0.0})
    cold = SequenceSampler(tok, SamplingParams(temperature=0.05, seed=0), [])  # p(b) = e^-20
    assert {cold.choose(logits) for _ in range(200)} == {a}
    warm = SequenceSampler(tok, SamplingParams(temperature=1.0, seed=0), [])  # p(b) = 0.27
    draws = [warm.choose(logits) for _ in range(400)]
    assert 0.15 < draws.count(b) / 400 < 0.4


def test_top_k_keeps_the_k_most_likely(tok):
    a, b, c = ids_of(tok, "abc")
    logits = logits_for(tok, {a: 1.0, b: 0.9, c: 0.8})
    sampler = SequenceSampler(tok, SamplingParams(top_k=2, temperature=2.0, seed=0), [])
    assert {sampler.choose(logits) for _ in range(200)} == {a, b}


def test_logprobs_are_the_tempered_distribution(tok):
    a, b = ids_of(tok, "ab")
    logits = logits_for(tok, {a: 1.0, b: 0.0})
    sampler = SequenceSampler(tok, SamplingParams(temperature=0.5), [])
    chosen, top = sampler.logprobs(logits, b, top=2)
    # softmax([1, 0] / 0.5) = [e^2, 1] / (e^2 + 1)
    assert chosen == pytest.approx(-math.log(math.exp(2) + 1))
    assert top == pytest.approx({"a": 2 - math.log(math.exp(2) + 1), "b": -math.log(math.exp(2) + 1)})
    assert list(top) == ["a", "b"]  # most likely first
    greedy = SequenceSampler(tok, SamplingParams(temperature=0), [])
    assert greedy.logprobs(logits, a, top=0) == (pytest.approx(1 - math.log(math.e + 1)), {})


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", 5.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 10.5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("stop", ("",)),
        ("stop", tuple("abcdefghi")),
        ("seed", "42"),
    ],
)
def test_out_of_bounds_parameters_are_refused(field, value, model, tok):
    params = SamplingParams(**{field: value})
    with pytest.raises(ConfigError) as err:
        params.validate()
    assert err.value.param == field
    assert field in str(err.value)
    with pytest.raises(ConfigError):
        stream_generate(model, tok, "the", params)
    assert model.calls == []  # refused before any work


def test_bounds_are_inclusive_where_documented():
    SamplingParams(max_tokens=1, temperature=5.0, top_p=1.0, min_p=0.0, repetition_penalty=10.0).validate()
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, stop=tuple("abcdefgh"), seed=0).validate()
    assert SamplingParams(stop=["\n"]).stop == ("\n",)  # a list (JSON, argparse) becomes a tuple


def test_stop_string_across_byte_level_bpe_tokens_in_chinese():
    tok = fit_tokenizer("bpe", "你好，世界！今天天气很好。再见，世界。\n" * 3, vocab_size=300)
    # 猫 and 狗 are not in the corpus: each is three byte tokens, so the stop string spans six
    ids = tok.encode("你好猫狗再见")
    assert [tok.decode([i]) for i in ids].count("\ufffd") >= 6
    sampler = SequenceSampler(tok, SamplingParams(stop=("猫狗",)), [])
    pieces = [sampler.push(i) for i in ids]
    assert "".join(pieces) == "你好"
    assert sampler.finish_reason == "stop"
    assert "\ufffd" not in "".join(pieces)  # no half characters were emitted
