"""The fast decode steps against the model's own forward: fused fp32 is the same text, int8 within a bound."""

from __future__ import annotations

import pytest
import torch

from lm.decode import build_step, int8_available
from lm.errors import ConfigError
from lm.model import LSTMLanguageModel, ModelConfig
from lm.sampler import prompt_ids
from lm.tokenizers import CharTokenizer

PROMPTS = ["Shall I compare thee", "To be, or not to be", "Love", "x", "And summer's lease hath all too short a date"]
INT8_LOGPROB_BOUND = 0.05  # nats: max |log p_int8 - log p_fp32| over the teacher-forced tokens (docs/PERFORMANCE.md)


@pytest.fixture
def model(char_tokenizer: CharTokenizer) -> LSTMLanguageModel:
    """A 16-unit, 2-layer LSTM with weights large enough to give peaked, prompt-dependent predictions."""
    torch.manual_seed(3)
    cfg = ModelConfig(char_tokenizer.vocab_size, embedding_dim=16, hidden_dim=16, layers=2, dropout=0.0)
    m = LSTMLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.4)
    return m


def _greedy(model: LSTMLanguageModel, kind: str, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill with the model, then n greedy steps with the `kind` step; the ids and each step's log-probs."""
    step = build_step(model, kind)
    with torch.inference_mode():
        logits, (h, c) = model(torch.tensor([ids]))
        h, c = h.clone(), c.clone()
        token = int(logits[0, -1].argmax())
        out, logprobs = [token], []
        for _ in range(n):
            step_logits = step(torch.tensor([token]), h, c)  # (1, V); h, c updated in place
            logprobs.append(torch.log_softmax(step_logits[0], dim=-1))
            token = int(step_logits[0].argmax())
            out.append(token)
    return out, logprobs


def test_fused_fp32_greedy_text_equals_the_reference(model: LSTMLanguageModel, char_tokenizer: CharTokenizer) -> None:
    for prompt in PROMPTS:
        ids = prompt_ids(char_tokenizer, prompt)
        ref, ref_lp = _greedy(model, "reference", ids, 60)
        fused, fused_lp = _greedy(model, "fused", ids, 60)
        assert fused == ref, prompt
        assert max(float((a - b).abs().max()) for a, b in zip(ref_lp, fused_lp, strict=True)) < 1e-4


def _teacher_forced_logprobs(model: LSTMLanguageModel, kind: str, tokens: list[int]) -> torch.Tensor:
    step = build_step(model, kind)
    h, c = model.init_state(1)
    rows = []
    with torch.inference_mode():
        for token in tokens:
            rows.append(torch.log_softmax(step(torch.tensor([token]), h, c)[0], dim=-1))
    return torch.stack(rows)  # (T, V)


@pytest.mark.skipif(not int8_available(), reason="this torch build has no int8 matmul")
def test_int8_log_probabilities_stay_within_the_documented_bound(
    model: LSTMLanguageModel, char_tokenizer: CharTokenizer
) -> None:
    tokens = char_tokenizer.encode(" ".join(PROMPTS) * 2)
    ref = _teacher_forced_logprobs(model, "reference", tokens)
    int8 = _teacher_forced_logprobs(model, "int8", tokens)
    assert float((ref - int8).abs().max()) < INT8_LOGPROB_BOUND
    assert float((ref - int8).abs().max()) > 0  # it is a different arithmetic, not the reference by mistake


@pytest.mark.parametrize("kind", ["fused", "int8"])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(char_tokenizer: CharTokenizer, kind: str) -> None:
    """A stream gets the same text alone or beside 7 others: int8's state is exactly the same (integer
    accumulation), the fp32 matmuls (fused gates, the head) agree to rounding, as the reference's do.

    Exactly: for hidden sizes that are a multiple of 32 (docs/PERFORMANCE.md), where torch's vector
    kernels cover a row whatever the batch size, with no scalar tail that rounds differently."""
    torch.manual_seed(3)
    cfg = ModelConfig(char_tokenizer.vocab_size, embedding_dim=16, hidden_dim=32, layers=2, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    step = build_step(model, kind)
    torch.manual_seed(0)
    V, H = model.cfg.vocab_size, model.cfg.hidden_dim
    tokens = torch.randint(0, V, (8,))
    h, c = torch.rand(2, 8, H) * 2 - 1, torch.randn(2, 8, H)
    h1, c1 = h[:, 3:4].clone(), c[:, 3:4].clone()
    batch = step(tokens, h, c)
    alone = step(tokens[3:4], h1, c1)
    torch.testing.assert_close(batch[3], alone[0], rtol=1e-5, atol=1e-5)
    if kind == "int8":
        assert torch.equal(h[:, 3], h1[:, 0]) and torch.equal(c[:, 3], c1[:, 0])
    else:
        torch.testing.assert_close(h[:, 3], h1[:, 0], rtol=1e-5, atol=1e-5)


def test_an_unknown_kind_is_a_config_error(model: LSTMLanguageModel) -> None:
    with pytest.raises(ConfigError, match="decode kind"):
        build_step(model, "onnx")


@pytest.mark.parametrize("kind", ["reference", "fused", "int8"])
def test_prefill_of_a_prompt_equals_decoding_it_token_by_token(
    model: LSTMLanguageModel, char_tokenizer: CharTokenizer, kind: str
) -> None:
    """int8: bit for bit (so a state cached after a completion equals the prompt's prefill); fp32: to rounding."""
    step = build_step(model, kind)
    tokens = torch.tensor(char_tokenizer.encode(PROMPTS[4] * 3))  # 132 tokens: several power-of-two pieces
    h1, c1 = model.init_state(1)
    logits = step.prefill(tokens, h1, c1)  # (V,)
    h2, c2 = model.init_state(1)
    for token in tokens:
        step_logits = step(token[None], h2, c2)[0]
    if kind == "int8":
        assert torch.equal(h1, h2) and torch.equal(c1, c2) and torch.equal(logits, step_logits)
    else:
        torch.testing.assert_close((h1, c1, logits), (h2, c2, step_logits), rtol=1e-4, atol=1e-5)
    ref_logits, (h_ref, _) = model(tokens[None])
    torch.testing.assert_close(h1, h_ref, rtol=0, atol=0.05)  # every kind runs the same model
