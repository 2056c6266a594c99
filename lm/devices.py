"""Where torch runs: one answer to "auto", "cpu" or "cuda", for training and serving alike."""

from __future__ import annotations

import torch

from lm.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(setting: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; `cuda` without one is a ConfigError."""
    if setting not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {setting!r}", "device")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but torch sees no CUDA device", "device")
    return torch.device(setting)
