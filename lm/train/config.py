"""The training recipe: `TrainConfig`, the bounds of its fields, and the size of the model it plans.

Every field is a `textgen train` flag and a `POST /train` field; this is the one place their
defaults live (the CLI's help, the HTTP schema and the parameter estimate all read them here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from lm.devices import DEVICES
from lm.errors import ConfigError
from lm.formats import DATA_FORMATS, DataFormat
from lm.model import LSTMLanguageModel, ModelConfig, count_parameters
from lm.tokenizers import KINDS, WORD_RE, planned_vocab_size
from lm.train.sizing import SIZE_FIELDS, fit_recipe

TOKENIZERS = KINDS
PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_EPOCHS = 10  # the passes a run makes when neither epochs nor a time budget is given

# Inclusive bounds of every numeric hyperparameter: shared by the CLI and the HTTP schema.
BOUNDS: dict[str, tuple[float, float]] = {
    "vocab_size": (16, 100_000),
    "embedding_dim": (4, 4096),
    "hidden_dim": (4, 4096),
    "layers": (1, 8),
    "dropout": (0.0, 0.9),
    "seq_len": (2, 2048),
    "batch_size": (1, 2048),
    "lr": (1e-6, 1.0),
    "weight_decay": (0.0, 1.0),
    "grad_clip": (0.0, 100.0),
    "warmup_steps": (0, 100_000),
    "epochs": (1, 10_000),
    "max_steps": (1, 100_000_000),
    "time_budget_s": (1.0, 30 * 24 * 3600.0),
    "weight_drop": (0.0, 0.9),
    "embedding_dropout": (0.0, 0.9),
    "ar": (0.0, 100.0),
    "tar": (0.0, 100.0),
    "ema": (0.0, 0.99999),
    "patience": (1, 1000),
    "val_fraction": (0.001, 0.5),
    "seed": (0, 2**63 - 1),
    "threads": (1, 256),
}


@dataclass
class TrainConfig:
    """Every field is a `textgen train` flag and a `POST /train` field. The default is the char recipe."""

    tokenizer: str = "char"
    # The sizes: None (not given) = fitted to the corpus and the budget (lm/train/sizing.py `fit_recipe`);
    # train() fills them in, and its result's config holds what it used.
    vocab_size: int | None = None
    embedding_dim: int | None = None
    hidden_dim: int | None = None
    layers: int | None = None
    dropout: float | None = None
    tie_weights: bool | None = None
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 8e-3  # lr and weight_decay: chosen by the runs in docs/TRAINING.md, "The default recipe"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100
    epochs: int | None = None  # None: DEFAULT_EPOCHS, or no cap under time_budget_s (`epoch_cap`)
    max_steps: int | None = None
    time_budget_s: float | None = None
    patience: int | None = None  # early stopping: epochs without a better validation loss
    val_fraction: float = 0.1
    seed: int = 1337
    threads: int | None = None
    precision: str = "auto"
    device: str = "auto"
    data_format: DataFormat = "text"  # text, chat (loss on the assistant's tokens) or completion: lm/formats.py
    # AWD-LSTM's regularisers (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models"), on
    # where they measurably helped (AR/TAR at AWD-LSTM's weights, locked dropout); docs/TRAINING.md,
    # "The default recipe", says what each bought
    weight_drop: float = 0.0  # DropConnect on each layer's hidden-to-hidden weights, one mask per step
    locked_dropout: bool = True  # `dropout` masks shared by every step of a window (variational dropout)
    embedding_dropout: float = 0.0  # drop whole words (rows of the embedding) per step
    ar: float = 2.0  # activation regularisation: ar * mean(h^2) of the last layer's dropped output
    tar: float = 1.0  # temporal AR: tar * mean((h_t - h_(t-1))^2) of the last layer's output
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and kept; 0: off

    def epoch_cap(self) -> int | None:
        """The epochs that end a run: as given; unset, DEFAULT_EPOCHS, or none under a time budget."""
        if self.epochs is not None:
            return self.epochs
        return None if self.time_budget_s is not None else DEFAULT_EPOCHS

    def validate(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ConfigError(f"data_format must be one of {', '.join(DATA_FORMATS)}", "data_format")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}", "tokenizer")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}", "precision")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}", "device")
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}", name)
            if not lo <= value <= hi:
                raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}", name)
        sizes = (self.embedding_dim, self.hidden_dim)
        if self.tie_weights and None not in sizes and sizes[0] != sizes[1]:
            raise ConfigError("tie_weights needs embedding_dim equal to hidden_dim", "tie_weights")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The architecture; every size must be set (`fitted` fills in the ones not given)."""
        emb, hidden, layers, dropout = self.embedding_dim, self.hidden_dim, self.layers, self.dropout
        if emb is None or hidden is None or layers is None or dropout is None or self.tie_weights is None:
            raise ValueError("model_config needs every size; call fitted() first")
        return ModelConfig(
            vocab_size=vocab_size,
            embedding_dim=emb,
            hidden_dim=hidden,
            layers=layers,
            dropout=dropout,
            tie_weights=self.tie_weights,
        )

    def fitted(self, text: str) -> tuple[TrainConfig, dict[str, Any] | None]:
        """This config with the sizes not given fitted to `text` and the budget, and the choice (None when
        every size was given). Deterministic: the same text and config fit the same sizes."""
        given = {name: getattr(self, name) for name in SIZE_FIELDS if getattr(self, name) is not None}
        if len(given) == len(SIZE_FIELDS):
            return self, None
        symbols = len(set(WORD_RE.findall(text))) if self.tokenizer == "word" else len(set(text))
        sizes, reason = fit_recipe(len(text), symbols, self.tokenizer, self.time_budget_s, given)
        fitted = {name: value for name, value in sizes.items() if name not in given}
        choice = {**sizes, "fitted": sorted(fitted), "reason": reason}
        return replace(self, **fitted), choice


def planned_parameters(cfg: TrainConfig, text: str, base_architecture: dict[str, Any] | None = None) -> int:
    """The parameter count of the model `train(text, cfg)` builds, without training or fitting anything.

    The model is built from `cfg`, its unset sizes fitted to `text` (or, for a fine-tune, from the base
    model's architecture) on the meta device, which allocates nothing, and its parameters are counted:
    the same count as the trained model's, for every tokenizer and size (lm/tokenizers.py
    `planned_vocab_size`: exact for char and word; bpe plans the vocab_size it asks for, which a corpus
    with enough distinct pairs reaches).
    """
    if base_architecture is not None:
        model_cfg = ModelConfig.from_dict(base_architecture)
    else:
        cfg, _ = cfg.fitted(text)
        model_cfg = cfg.model_config(planned_vocab_size(cfg.tokenizer, text, cfg.vocab_size))
    with torch.device("meta"):
        return count_parameters(LSTMLanguageModel(model_cfg))
