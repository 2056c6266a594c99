"""Evaluation: the loss of a model on held-out text, and the short samples training reports."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lm.data import batchify, check_text, encode_segments, windows
from lm.errors import CorpusError
from lm.formats import DataFormat, segments
from lm.model import LSTMLanguageModel, State
from lm.sampler import SamplingParams, generate
from lm.tokenizers import Tokenizer


@torch.inference_mode()
def evaluate_ids(
    model: LSTMLanguageModel, data: Tensor, seq_len: int, *, bf16: bool = False, mask: Tensor | None = None
) -> float:
    """Mean cross-entropy (nats per token) over batchified `data`, carrying the state across windows;
    with a `mask` (data's shape, lm/data.py `encode_segments`), over the targets it marks only."""
    was_training = model.training
    model.eval()
    state: State | None = None
    total, count = 0.0, 0
    masks = windows(mask, max(seq_len, 256)) if mask is not None else None
    for x, y in windows(data, max(seq_len, 256)):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
        target_mask = next(masks)[1] if masks is not None else None
        loss, n = token_loss(logits, y, target_mask, reduction="sum")
        total += loss.item()
        count += n
    model.train(was_training)
    return total / max(1, count)


def token_loss(logits: Tensor, y: Tensor, mask: Tensor | None, *, reduction: str = "mean") -> tuple[Tensor, int]:
    """Cross-entropy of logits (B, t, V) against targets y (B, t), over the targets `mask` (B, t) marks
    (every target when None): the mean or the sum, and how many targets it counts. Without a mask this is
    the plain cross-entropy of every target, so plain text trains as it always did."""
    flat = logits.float().reshape(-1, logits.size(-1))  # (B*t, V)
    if mask is None:
        return nn.functional.cross_entropy(flat, y.reshape(-1), reduction=reduction), y.numel()
    losses = nn.functional.cross_entropy(flat, y.reshape(-1), reduction="none")  # (B*t,)
    keep = mask.reshape(-1)
    count = int(keep.sum())
    total = losses.masked_fill(~keep, 0.0).sum()
    return (total if reduction == "sum" else total / max(1, count)), count


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
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    text: str,
    *,
    seq_len: int = 256,
    batch_size: int = 16,
    data_format: DataFormat = "text",
    chat_template: dict[str, Any] | None = None,
) -> dict[str, float | int]:
    """Loss, perplexity and bits per character of `model` on `text` (the whole text is scored). A chat or
    prompt/completion text (lm/formats.py) is scored on its trainable tokens only (the assistant's, the
    completions), rendered with `chat_template`; `tokens` and `chars` then count those."""
    check_text(text, "evaluation text")
    ids, mask = encode_segments(tokenizer, segments(text, data_format, chat_template))
    if len(ids) < 2:
        raise CorpusError("evaluation text is too short: it needs at least 2 tokens")
    streams = max(1, min(batch_size, (len(ids) - 1) // 2))
    device = next(model.parameters()).device
    data = batchify(ids, streams).to(device)
    target_mask = batchify(mask, streams).to(device) if mask is not None else None
    if target_mask is not None and not bool(target_mask[:, 1:].any()):
        raise CorpusError("the evaluation text has no tokens to score (no assistant message, no completion)")
    loss = evaluate_ids(model, data, seq_len, mask=target_mask)
    if target_mask is None:
        tokens = streams * (data.size(1) - 1)
        chars = tokens * len(text) / len(ids)
    else:
        tokens = int(target_mask[:, 1:].sum())
        scored = ids[mask]
        chars = tokens * len(tokenizer.decode(scored.tolist())) / max(1, len(scored))
    return {
        "tokens": tokens,
        "chars": round(chars),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_char": loss * tokens / (max(chars, 1e-9) * math.log(2)),
    }


def sample_text(model: LSTMLanguageModel, tokenizer: Tokenizer, seed: int, max_tokens: int = 160) -> str:
    """A short seeded sample for progress reports (each epoch's `sample`)."""
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, "", SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed))
    finally:
        model.train(was_training)
