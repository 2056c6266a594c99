"""Ways a checkpoint folder breaks, each applied to a copy of a good one: what the registry and the
server must refuse, with the old model serving on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lm.checkpoint import CONFIG_FILE, MODEL_FILE
from lm.tokenizers import TOKENIZER_FILE


def truncate_weights(folder: Path) -> None:
    weights = folder / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def wrong_shapes(folder: Path) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["architecture"]["hidden_dim"] *= 2  # the weights are for the original size
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def no_tokenizer(folder: Path) -> None:
    (folder / TOKENIZER_FILE).unlink()


def config_not_json(folder: Path) -> None:
    (folder / CONFIG_FILE).write_text('{"format_version": 1, "architecture": ')


def no_weights(folder: Path) -> None:
    (folder / MODEL_FILE).unlink()


def newer_format(folder: Path) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["format_version"] = 99
    (folder / CONFIG_FILE).write_text(json.dumps(config))


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "truncated-weights": truncate_weights,
    "wrong-shapes": wrong_shapes,
    "no-tokenizer": no_tokenizer,
    "config-not-json": config_not_json,
    "no-weights": no_weights,
    "newer-format": newer_format,
}
