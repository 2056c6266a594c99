"""Helpers of the browser tests (tests/e2e/test_ui.py): a tiny models folder, a real `textgen serve`
process, and headless Chromium driven by Playwright.

The models are 16-unit char LSTMs with fixed random weights, so generation runs at thousands of
tokens a second and a training job on the 1-KB corpus takes a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import Registry
from lm.tokenizers import fit_tokenizer
from tests.corpora import HAMLET, SONNET_18, first_lines

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-output" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

CORPUS = first_lines(SONNET_18, 6) + first_lines(HAMLET, 9)
MODELS = ("tiny-a", "tiny-b", "tiny-c")  # tiny-a is active
TRAINING = {"recipe": {"note": "random weights for tests"}, "corpus_sha256": "0" * 64, "corpus_bytes": len(CORPUS)}


def tiny_model(vocab_size: int, seed: int) -> LSTMLanguageModel:
    """A 16-unit, 1-layer LSTM with peaked random weights (distinct text per seed)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size, embedding_dim=16, hidden_dim=16, layers=1, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 2.0)
    return model


def build_models(path: Path) -> Path:
    """Publish MODELS into `path` (newest last) and activate the first."""
    registry = Registry(path)
    tokenizer = fit_tokenizer("char", CORPUS)
    for seed, model_id in enumerate(MODELS, start=1):
        metrics = {"val_loss": 3.0 + seed / 10, "val_perplexity": 20.0 + seed}
        registry.publish(
            tiny_model(tokenizer.vocab_size, seed), tokenizer, model_id=model_id, training=TRAINING, metrics=metrics
        )
        time.sleep(0.01)  # distinct created_at: listings are newest first
    registry.activate(MODELS[0])
    return path
