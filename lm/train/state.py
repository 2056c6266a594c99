"""Resumable training state: written at each epoch's end, read back to resume a stopped job.

    <state_dir>/
        train_state.safetensors   the model, the optimizer's moments, the best weights, the weights' EMA, the RNG state
        train_state.json          the recipe, the corpus digest, the progress, the optimizer's param groups
        tokenizer.json            the tokenizer, so a resume encodes the corpus exactly as before

Tensors go to safetensors and everything else to JSON: no pickle. Each file is replaced atomically
(lm/files.py). A state made from another corpus or another shape of model is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lm.errors import ConfigError, CorpusError
from lm.files import atomic_write
from lm.tokenizers import Tokenizer
from lm.train.config import TrainConfig

log = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_TOKENIZER = "tokenizer.json"


@dataclass
class Progress:
    """Everything the loop carries that a resume must restore."""

    epoch: int = 0  # completed epochs
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    best_val: float | None = None
    best_epoch: int | None = None  # the epoch whose weights are kept (the best by validation loss)
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # within the epoch being trained, for a state saved when a job is stopped (paused, handed back) mid-epoch:
    window: int = 0  # its windows already trained
    epoch_loss_sum: float = 0.0  # their loss, summed (weighted by counted targets where a mask applies)
    epoch_weight: float = 0.0


def save_state(
    path: Path,
    cfg: TrainConfig,
    corpus_sha: str,
    tokenizer: Tokenizer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    prog: Progress,
    best: dict[str, Tensor] | None,
    carry: tuple[Tensor, Tensor] | None = None,
    averaged: dict[str, Tensor] | None = None,
) -> None:
    """Write the state; `carry` is the LSTM state carried into the next window, for a state saved mid-epoch."""
    path.mkdir(parents=True, exist_ok=True)
    opt_state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for idx, slots in opt_state["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    if best is not None:
        tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if carry is not None:
        tensors["carry.h"], tensors["carry.c"] = (t.detach().cpu().contiguous() for t in carry)
    if averaged is not None:  # the weights' EMA (TrainConfig.ema), by parameter index
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in averaged.items()})
    meta = {
        "config": cfg.to_dict(),
        "corpus_sha256": corpus_sha,
        "progress": asdict(prog),
        "param_groups": opt_state["param_groups"],
    }
    # Tied weights share storage; safetensors wants distinct tensors.
    tensors = {k: v.clone() for k, v in tensors.items()}
    atomic_write(path / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    atomic_write(path / STATE_TOKENIZER, lambda p: tokenizer.save(p))
    atomic_write(path / STATE_JSON, json.dumps(meta, indent=1).encode("utf-8"))


def load_state(
    path: Path, cfg: TrainConfig, corpus_sha: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Progress, dict[str, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """(progress, the best weights so far, the carried LSTM state of a state saved mid-epoch)."""
    meta = json.loads((path / STATE_JSON).read_text())
    if meta["corpus_sha256"] != corpus_sha:
        raise CorpusError(f"the saved training state in {path} was made from a different corpus")
    saved = TrainConfig.from_dict(meta["config"])
    shape_keys = ("embedding_dim", "hidden_dim", "layers", "tie_weights", "seq_len", "batch_size", "tokenizer")
    if any(getattr(saved, k) != getattr(cfg, k) for k in shape_keys):
        raise ConfigError(f"the saved training state in {path} was made with other hyperparameters")
    tensors = load_file(str(path / STATE_TENSORS))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, slot = key.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    carry = (tensors["carry.h"], tensors["carry.c"]) if "carry.h" in tensors else None
    prog = Progress(**meta["progress"])
    log.info("resuming from %s at epoch %d, step %d (window %d of the epoch)", path, prog.epoch, prog.step, prog.window)
    return prog, best, carry


def load_averaged(path: Path) -> dict[str, Tensor] | None:
    """The weights' EMA a state holds (TrainConfig.ema), by parameter index; None when it holds none."""
    tensors = load_file(str(path / STATE_TENSORS))
    return {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
