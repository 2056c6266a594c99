"""Evaluation: the loss of a model on held-out text, and the short samples training reports."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lm.data import batchify, check_text, windows
from lm.errors import CorpusError
from lm.model import LSTMLanguageModel, State
from lm.sampler import SamplingParams, generate
from lm.tokenizers import Tokenizer


@torch.inference_mode()
def evaluate_ids(model: LSTMLanguageModel, data: Tensor, seq_len: int, *, bf16: bool = False) -> float:
    """Mean cross-entropy (nats per token) over batchified `data`, carrying the state across windows."""
    was_training = model.training
    model.eval()
    state: State | None = None
    total, count = 0.0, 0
    for x, y in windows(data, max(seq_len, 256)):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train(was_training)
    return total / max(1, count)


@torch.inference_mode()
def score_ids(
    model: LSTMLanguageModel, prompts: list[list[int]], top: int = 0, *, seq_len: int = 256
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per prompt of T ids: the log-probability of each of ids[1:] given the ids before it, (T-1,), and the
    `top` likeliest tokens at each of those positions, (T-1, top) values and (T-1, top) ids.

    Each prompt starts from the zero state, as each stream of `evaluate_ids` does, and its first id has no
    prediction. The forward is `evaluate_ids`'s (fp32, windows of `seq_len` carrying the state, a float32
    log-softmax), so the mean of -logprob over a text's streams is `evaluate`'s loss on it. The prompts run
    as one batch, longest first; a row leaves the batch when it ends (right padding cannot change an
    LSTM's earlier outputs). The model must be in eval mode; it is not changed, so an engine may share it.
    """
    if model.training:
        raise ValueError("score_ids needs the model in eval mode (dropout would randomise the scores)")
    if not prompts:
        return []
    device = next(model.parameters()).device
    top = min(top, model.cfg.vocab_size)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    span = max((len(p) for p in prompts), default=0) - 1  # predicted positions of the longest prompt
    data = torch.zeros(len(prompts), max(span + 1, 1), dtype=torch.long)  # (B, T), right-padded, longest first
    for row, i in enumerate(order):
        data[row, : len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long)
    predicted = torch.tensor([len(prompts[i]) - 1 for i in order])  # (B,)
    chosen = torch.zeros(len(prompts), max(span, 0))  # (B, T-1)
    top_values = torch.zeros(len(prompts), max(span, 0), top)  # (B, T-1, top)
    top_ids = torch.zeros(len(prompts), max(span, 0), top, dtype=torch.long)
    state: State | None = None
    for start in range(0, span, seq_len):
        rows = int((predicted > start).sum())  # the rows still running: a prefix, longest first
        t = min(seq_len, span - start)
        x, y = data[:rows, start : start + t], data[:rows, start + 1 : start + 1 + t]  # (b, t)
        if state is not None:
            state = (state[0][:, :rows].contiguous(), state[1][:, :rows].contiguous())  # (layers, b, H)
        logits, state = model(x.to(device), state)  # (b, t, V)
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (b, t, V)
        chosen[:rows, start : start + t] = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if top:
            top_values[:rows, start : start + t], top_ids[:rows, start : start + t] = lp.topk(top)
    scores: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for row, i in enumerate(order):
        n = max(0, int(predicted[row]))
        scores[i] = (chosen[row, :n], top_values[row, :n], top_ids[row, :n])
    return [scores[i] for i in range(len(prompts))]


def evaluate(
    model: LSTMLanguageModel, tokenizer: Tokenizer, text: str, *, seq_len: int = 256, batch_size: int = 16
) -> dict[str, float | int]:
    """Loss, perplexity and bits per character of `model` on `text` (the whole text is scored)."""
    check_text(text, "evaluation text")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < 2:
        raise CorpusError("evaluation text is too short: it needs at least 2 tokens")
    streams = max(1, min(batch_size, (len(ids) - 1) // 2))
    data = batchify(ids, streams).to(next(model.parameters()).device)
    loss = evaluate_ids(model, data, seq_len)
    tokens = streams * (data.size(1) - 1)
    chars = tokens * len(text) / len(ids)
    return {
        "tokens": tokens,
        "chars": round(chars),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_char": loss * tokens / (chars * math.log(2)),
    }


def sample_text(model: LSTMLanguageModel, tokenizer: Tokenizer, seed: int, max_tokens: int = 160) -> str:
    """A short seeded sample for progress reports (each epoch's `sample`)."""
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, "", SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed))
    finally:
        model.train(was_training)
