"""The LSTM language model: Embedding -> multi-layer LSTM -> Dropout -> Linear.

Shaped after pytorch/examples word_language_model (RNNModel) and karpathy's char-rnn:
the state is carried between calls, so generation feeds one token per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from lm.errors import ConfigError

State = tuple[Tensor, Tensor]  # (h, c), each (layers, B, hidden)


@dataclass
class ModelConfig:
    vocab_size: int
    embedding_dim: int = 512
    hidden_dim: int = 512
    layers: int = 2
    dropout: float = 0.1
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be at least 2, got {self.vocab_size}", "vocab_size")
        if self.tie_weights and self.embedding_dim != self.hidden_dim:
            raise ConfigError(
                f"tie_weights needs embedding_dim == hidden_dim (got {self.embedding_dim} and {self.hidden_dim})",
                "tie_weights",
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown architecture keys: {sorted(unknown)}")
        return cls(**d)


class LSTMLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        # dropout= applies between stacked layers only (PyTorch warns and ignores it for 1 layer)
        self.lstm = nn.LSTM(
            cfg.embedding_dim,
            cfg.hidden_dim,
            cfg.layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        if cfg.tie_weights:
            # Press & Wolf 2017, "Using the Output Embedding to Improve Language Models"
            self.head.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if not self.cfg.tie_weights:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        # forget-gate bias 1 (Jozefowicz et al. 2015): gates are ordered i, f, g, o in nn.LSTM
        h = self.cfg.hidden_dim
        for name, p in self.lstm.named_parameters():
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    p.zero_()
                    p[h : 2 * h].fill_(1.0)
            elif name.startswith("bias_hh"):
                with torch.no_grad():
                    p.zero_()

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        x = self.drop(self.embedding(ids))  # (B, T, E)
        out, state = self.lstm(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, state

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        shape = (self.cfg.layers, batch, self.cfg.hidden_dim)
        dtype = dtype or self.head.weight.dtype
        device = device or self.head.weight.device
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
