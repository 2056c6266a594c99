"""Shared tiny fixtures for tests/lm: a 2-KB corpus, a 16-unit LSTM with fixed weights, a models folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lm.model import LSTMLanguageModel, ModelConfig
from lm.tokenizers import CharTokenizer, fit_tokenizer
from tests.corpora import CHINESE_CORPUS, TINY_CORPUS

__all__ = ["CHINESE_CORPUS", "TINY_CORPUS"]  # the tests of tests/lm import them from here


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # The test machine's cores are shared; tiny models gain nothing from more threads.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_corpus() -> str:
    return TINY_CORPUS


@pytest.fixture(scope="session")
def chinese_corpus() -> str:
    return CHINESE_CORPUS


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    tokenizer = fit_tokenizer("char", TINY_CORPUS)
    assert isinstance(tokenizer, CharTokenizer)
    return tokenizer


def _make_tiny_model(vocab_size: int, *, tie_weights: bool = False, seed: int = 0) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size, embedding_dim=16, hidden_dim=16, layers=2, dropout=0.1, tie_weights=tie_weights)
    return LSTMLanguageModel(cfg).eval()


@pytest.fixture
def make_tiny_model() -> Callable[..., LSTMLanguageModel]:
    """make_tiny_model(vocab_size, *, tie_weights=False, seed=0): a 2-layer, 16-unit LSTM, fixed weights, eval mode."""
    return _make_tiny_model


@pytest.fixture
def tiny_model(char_tokenizer: CharTokenizer) -> LSTMLanguageModel:
    """A 2-layer, 16-unit LSTM with fixed weights (seed 0) sized for `char_tokenizer`, in eval mode."""
    return _make_tiny_model(char_tokenizer.vocab_size)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path
