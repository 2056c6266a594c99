"""Model registry: listing, the active pointer's compare-and-set, publish, delete, load."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lm.errors import ActiveModelError, CheckpointError, InvalidModelId, ModelNotFound, PromotionConflict
from lm.model import LSTMLanguageModel, count_parameters
from lm.registry import FilePointer, Registry
from lm.tokenizers import Tokenizer

TRAINING = {"recipe": {"hidden_dim": 16}, "corpus_sha256": "0" * 64, "corpus_bytes": 1751, "seed": 1337}
METRICS = {"train_loss": 2.5, "val_loss": 2.75}


@pytest.fixture
def registry(models_dir: Path) -> Registry:
    return Registry(models_dir)


def _publish(registry: Registry, model: LSTMLanguageModel, tokenizer: Tokenizer, model_id: str, **kw: Any) -> str:
    return registry.publish(model, tokenizer, model_id=model_id, training=TRAINING, metrics=METRICS, **kw)


def test_publish_then_list_and_get(
    registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    assert registry.list() == []
    assert _publish(registry, tiny_model, char_tokenizer, "first") == "first"
    time.sleep(0.01)  # created_at has millisecond resolution
    _publish(registry, tiny_model, char_tokenizer, "second")
    infos = registry.list()
    assert [i.model_id for i in infos] == ["second", "first"]  # newest first
    info = registry.get("first")
    assert info.path == registry.models_dir / "first"
    assert info.parameters == count_parameters(tiny_model)
    assert info.tokenizer == {"kind": "char", "vocab_size": char_tokenizer.vocab_size}
    assert info.metrics == METRICS
    assert info.training == TRAINING
    assert info.active is False
    assert info.size_bytes == sum(f.stat().st_size for f in info.path.iterdir())
    assert info.config["architecture"]["hidden_dim"] == 16


def test_list_skips_everything_that_is_not_a_checkpoint(
    registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    models = registry.models_dir
    _publish(registry, tiny_model, char_tokenizer, "real")
    (models / "jobs").mkdir()  # the training jobs' state
    (models / "jobs" / "config.json").write_text((models / "real" / "config.json").read_text())
    (models / ".tmp-half-1234").mkdir()  # a checkpoint being written
    (models / "empty").mkdir()  # no config.json
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text("{")
    (models / "Not_An_Id").mkdir()
    (models / "notes.txt").write_text("hello")
    assert [i.model_id for i in registry.list()] == ["real"]
    with pytest.raises(CheckpointError, match="config.json"):
        registry.get("broken")


def test_file_pointer_compare_and_set(models_dir: Path) -> None:
    pointer = FilePointer(models_dir)
    assert pointer.get() is None
    assert pointer.compare_and_set(None, "a") is True
    assert pointer.compare_and_set(None, "b") is False  # stale expectation loses
    assert pointer.get() == "a"
    assert pointer.compare_and_set("a", "b") is True
    assert (models_dir / "ACTIVE").read_text() == "b\n"
    assert [p.name for p in models_dir.iterdir() if p.name.startswith(".ACTIVE")] == []
    with pytest.raises(InvalidModelId):
        pointer.compare_and_set("b", "../evil")


def test_file_pointer_ignores_garbage(models_dir: Path) -> None:
    (models_dir / "ACTIVE").write_text("../../etc/passwd\n")
    assert FilePointer(models_dir).get() is None


def test_concurrent_compare_and_set_has_one_winner(models_dir: Path) -> None:
    results: list[bool] = []
    start = threading.Barrier(8)

    def contender(n: int) -> None:
        start.wait()
        results.append(FilePointer(models_dir).compare_and_set(None, f"m{n}"))

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_activate_with_a_stale_expectation_conflicts(
    registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    for model_id in ("old", "newer", "late"):
        _publish(registry, tiny_model, char_tokenizer, model_id)
    registry.activate("old", expected=None)
    registry.activate("newer", expected="old")
    with pytest.raises(PromotionConflict, match="'newer'"):
        registry.activate("late", expected="old")  # a job that started when "old" was active
    assert registry.active_id() == "newer"
    registry.activate("late")  # no expectation: unconditional
    assert registry.active_id() == "late"
    assert [i.model_id for i in registry.list() if i.active] == ["late"]
    with pytest.raises(ModelNotFound):
        registry.activate("ghost")
    assert registry.active_id() == "late"


def test_publish_can_activate(registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer) -> None:
    _publish(registry, tiny_model, char_tokenizer, "v1", activate=True)
    assert registry.active_id() == "v1"
    _publish(registry, tiny_model, char_tokenizer, "v2", activate=True, expected_active="v1")
    assert registry.active_id() == "v2"
    with pytest.raises(PromotionConflict):
        _publish(registry, tiny_model, char_tokenizer, "v3", activate=True, expected_active="v1")
    assert registry.active_id() == "v2"
    assert registry.get("v3").active is False  # published, not promoted


def test_publish_without_an_id_makes_one_up(
    registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    first = registry.publish(tiny_model, char_tokenizer, training=TRAINING, metrics=METRICS)
    second = registry.publish(tiny_model, char_tokenizer, training=TRAINING, metrics=METRICS)
    assert first.startswith("lstm-char-")
    assert first != second
    assert {i.model_id for i in registry.list()} == {first, second}


def test_unique_id(registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer) -> None:
    assert registry.unique_id("shakespeare") == "shakespeare"
    _publish(registry, tiny_model, char_tokenizer, "shakespeare")
    assert registry.unique_id("shakespeare") == "shakespeare-2"
    _publish(registry, tiny_model, char_tokenizer, "shakespeare-2")
    assert registry.unique_id("shakespeare") == "shakespeare-3"
    assert registry.unique_id("My Model!") == "my-model"
    assert registry.unique_id("../..") == "model"
    assert registry.unique_id("jobs") == "jobs-2"
    assert len(registry.unique_id("x" * 100)) <= 64


def test_delete_refuses_the_active_model(
    registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    _publish(registry, tiny_model, char_tokenizer, "live", activate=True)
    _publish(registry, tiny_model, char_tokenizer, "spare")
    with pytest.raises(ActiveModelError, match="'live' is the active model"):
        registry.delete("live")
    assert registry.load("live").model_id == "live"  # untouched

    registry.delete("spare")
    assert [i.model_id for i in registry.list()] == ["live"]
    assert sorted(p.name for p in registry.models_dir.iterdir()) == [".lock", "ACTIVE", "live"]
    with pytest.raises(ModelNotFound, match="no model named 'spare'"):
        registry.delete("spare")
    with pytest.raises(InvalidModelId):
        registry.delete("../live")


def test_load_defaults_to_the_active_model(
    registry: Registry, tiny_model: LSTMLanguageModel, char_tokenizer: Tokenizer
) -> None:
    with pytest.raises(ModelNotFound, match="no model is active"):
        registry.load()
    _publish(registry, tiny_model, char_tokenizer, "live", activate=True)
    ckpt = registry.load()
    assert ckpt.model_id == "live"
    ids = torch.tensor([char_tokenizer.encode("To be")])  # (1, T)
    with torch.no_grad():
        assert torch.equal(ckpt.model(ids)[0], tiny_model(ids)[0])
    with pytest.raises(ModelNotFound, match="'ghost'") as info:
        registry.load("ghost")
    assert str(info.value).startswith("no model named")  # plain message, not KeyError's quoted repr
