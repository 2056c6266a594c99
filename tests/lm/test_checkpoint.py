"""Checkpoint format: exact reload, atomic publication, strict loading with errors that name the file."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lm.checkpoint
from lm.checkpoint import (
    DEFAULT_CHAT_TEMPLATE,
    FORMAT_VERSION,
    load_checkpoint,
    read_config,
    save_checkpoint,
    validate_model_id,
)
from lm.errors import CheckpointError, InvalidModelId
from lm.model import LSTMLanguageModel, count_parameters
from lm.registry import Registry
from lm.tokenizers import Tokenizer, fit_tokenizer

TRAINING = {"recipe": {"hidden_dim": 16}, "corpus_sha256": "0" * 64, "corpus_bytes": 1751, "seed": 1337}
METRICS = {"train_loss": 2.5, "val_loss": 2.75, "val_perplexity": 15.6}


def _logits(model: LSTMLanguageModel, tokenizer: Tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode("Shall I compare thee")])  # (1, T)
    with torch.no_grad():
        logits, _ = model(ids)  # (1, T, V)
    return logits


def _save(models_dir: Path, model: LSTMLanguageModel, tokenizer: Tokenizer, model_id: str = "tiny") -> Path:
    return save_checkpoint(models_dir, model_id, model, tokenizer, training=TRAINING, metrics=METRICS)


def _edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_reload_gives_the_same_logits(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    ckpt = load_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert ckpt.model_id == "tiny"
    assert not ckpt.model.training  # eval mode: dropout off
    assert ckpt.model.cfg == tiny_model.cfg
    assert ckpt.tokenizer.to_dict() == char_tokenizer.to_dict()
    assert torch.equal(_logits(ckpt.model, ckpt.tokenizer), _logits(tiny_model, char_tokenizer))


def test_config_json_records_the_model(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    config = json.loads((_save(models_dir, tiny_model, char_tokenizer) / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["model_id"] == "tiny"
    assert config["created_at"].endswith("Z")
    assert datetime.fromisoformat(config["created_at"]).utcoffset() == timedelta(0)  # ISO-8601 UTC
    assert config["architecture"] == {
        "vocab_size": char_tokenizer.vocab_size,
        "embedding_dim": 16,
        "hidden_dim": 16,
        "layers": 2,
        "dropout": 0.1,
        "tie_weights": False,
    }
    assert config["tokenizer"] == {"kind": "char", "vocab_size": char_tokenizer.vocab_size}
    assert config["training"] == TRAINING
    assert config["metrics"] == METRICS
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert config["parameters"] == count_parameters(tiny_model)
    assert set(config["versions"]) == {"textgen", "torch", "safetensors", "tokenizers"}
    assert read_config(models_dir / "tiny") == config


def test_custom_chat_template_and_non_finite_metrics(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    template = {"system": "", "user": "Q: ", "assistant": "A: ", "separator": "\n", "stop": ["\nQ:"]}
    metrics = {"val_loss": 90.0, "val_perplexity": float("inf"), "history": [1.0, float("nan")]}
    path = save_checkpoint(
        models_dir, "tiny", tiny_model, char_tokenizer, training=TRAINING, metrics=metrics, chat_template=template
    )
    text = (path / "config.json").read_text()
    config = json.loads(text, parse_constant=pytest.fail)  # strict JSON: no NaN / Infinity literals
    assert config["chat_template"] == template
    assert config["metrics"] == {"val_loss": 90.0, "val_perplexity": None, "history": [1.0, None]}


def test_tied_weights_are_stored_once_and_retied(
    models_dir: Path, char_tokenizer: Tokenizer, make_tiny_model: Callable[..., LSTMLanguageModel]
) -> None:
    model = make_tiny_model(char_tokenizer.vocab_size, tie_weights=True)
    path = _save(models_dir, model, char_tokenizer)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "head.weight" not in set(f.keys())
        assert "embedding.weight" in set(f.keys())
    ckpt = load_checkpoint(path)
    assert ckpt.model.head.weight is ckpt.model.embedding.weight
    assert torch.equal(_logits(ckpt.model, char_tokenizer), _logits(model, char_tokenizer))


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_the_tokenizer_travels_inside_the_checkpoint(
    kind: str,
    models_dir: Path,
    tiny_corpus: str,
    chinese_corpus: str,
    make_tiny_model: Callable[..., LSTMLanguageModel],
) -> None:
    tokenizer = fit_tokenizer(kind, tiny_corpus + chinese_corpus, 400 if kind == "bpe" else None)
    model = make_tiny_model(tokenizer.vocab_size)
    ckpt = load_checkpoint(_save(models_dir, model, tokenizer))
    probe = "Shall I compare thee 道可道 🙂"
    assert ckpt.tokenizer.kind == kind
    assert ckpt.tokenizer.encode(probe) == tokenizer.encode(probe)
    assert torch.equal(_logits(ckpt.model, ckpt.tokenizer), _logits(model, tokenizer))


def test_an_existing_id_is_refused(models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="'tiny' already exists"):
        _save(models_dir, tiny_model, char_tokenizer)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in models_dir.iterdir()) == ["tiny"]


def test_failed_rename_leaves_no_checkpoint(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rename_fails(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "rename", rename_fails)
    with pytest.raises(OSError, match="I/O error"):
        _save(models_dir, tiny_model, char_tokenizer)
    assert list(models_dir.iterdir()) == []  # neither the checkpoint nor its temporary folder
    assert Registry(models_dir).list() == []


def test_crash_while_writing_weights_leaves_no_checkpoint(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        save_file(tensors, filename, metadata)
        size = Path(filename).stat().st_size
        os.truncate(filename, size // 2)  # half the file reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lm.checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(models_dir, tiny_model, char_tokenizer)
    assert list(models_dir.iterdir()) == []
    assert Registry(models_dir).list() == []


def test_a_killed_writers_temporary_folder_is_invisible(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    leftover = path.rename(models_dir / ".tmp-tiny2-0badc0de")  # what a process killed before rename() leaves
    (leftover / "model.safetensors").write_bytes(b"")
    assert Registry(models_dir).list() == []


def test_strict_load_rejects_mismatched_shapes(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    _edit_config(path, lambda c: c["architecture"].update(hidden_dim=32))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "model.safetensors" in message
    assert "'lstm.weight_ih_l0' has shape (64, 16)" in message
    assert "(128, 16)" in message


def test_strict_load_rejects_a_truncated_weights_file(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tokenizer.json", r"tokenizer\.json: missing"),
        ("model.safetensors", r"model\.safetensors: missing"),
        ("config.json", r"config\.json: missing"),
    ],
)
def test_a_missing_file_is_named(
    name: str, message: str, models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_config_json_problems_are_named(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    good = (path / "config.json").read_text()
    (path / "config.json").write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(path)

    (path / "config.json").write_text(good)
    _edit_config(path, lambda c: c.pop("architecture"))
    with pytest.raises(CheckpointError, match=r"config\.json: missing keys \['architecture'\]"):
        load_checkpoint(path)

    (path / "config.json").write_text(good)
    _edit_config(path, lambda c: c.update(format_version=2))
    with pytest.raises(CheckpointError, match="format_version 2 is not supported"):
        load_checkpoint(path)

    (path / "config.json").write_text(good)
    _edit_config(path, lambda c: c["architecture"].update(heads=4))
    with pytest.raises(CheckpointError, match="invalid architecture"):
        load_checkpoint(path)


def test_a_vocabulary_mismatch_is_named(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer, tiny_corpus: str
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    fit_tokenizer("char", tiny_corpus, vocab_size=10).save(path / "tokenizer.json")
    with pytest.raises(
        CheckpointError, match=rf"tokenizer\.json: has 10 tokens but .*vocab_size is {tiny_model.cfg.vocab_size}"
    ):
        load_checkpoint(path)


def test_a_corrupt_tokenizer_is_named(
    models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    path = _save(models_dir, tiny_model, char_tokenizer)
    (path / "tokenizer.json").write_text('{"kind": "bpe", "tokenizer": "{not json"}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer"):
        load_checkpoint(path)


def test_save_refuses_a_tokenizer_that_does_not_fit_the_model(
    models_dir: Path, tiny_model: LSTMLanguageModel, tiny_corpus: str
) -> None:
    with pytest.raises(CheckpointError, match="output tokens"):
        _save(models_dir, tiny_model, fit_tokenizer("char", tiny_corpus, vocab_size=10))
    assert list(models_dir.iterdir()) == []


@pytest.mark.parametrize(
    "bad", ["", "..", ".", "a/b", "../etc", "Upper", "a" * 65, ".hidden", "-x", "_x", "a..b", "jobs", "a b", "é", "a\n"]
)
def test_invalid_model_ids_never_touch_a_path(
    bad: str, models_dir: Path, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    with pytest.raises(InvalidModelId):
        validate_model_id(bad)
    with pytest.raises(InvalidModelId):
        _save(models_dir, tiny_model, char_tokenizer, model_id=bad)
    assert list(models_dir.iterdir()) == []
    assert list(models_dir.parent.iterdir()) == [models_dir]


@pytest.mark.parametrize("good", ["a", "0", "shakespeare-char", "m1.2_x-3", "a" * 64])
def test_valid_model_ids(good: str) -> None:
    assert validate_model_id(good) == good
