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
