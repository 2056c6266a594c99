"""The default recipe (issue 19): a time budget that is used, the best epoch kept, sizes fitted to the corpus
and the budget, and AWD-LSTM's regularisers through the training kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm.data import epoch_offset, rotate, windows
from lm.kernels import train_lstm
from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import Registry
from lm.tokenizers import WORD_RE
from lm.train import TrainConfig, TrainEvent, loop, planned_parameters, train
from lm.train.config import DEFAULT_EPOCHS
from lm.train.sizing import fit_recipe
from lm.train.state import STATE_TENSORS

from .conftest import TINY_CORPUS

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "shakespeare.txt"


def tiny(**overrides) -> TrainConfig:
    base = dict(
        embedding_dim=16,
        hidden_dim=16,
        layers=1,
        dropout=0.0,
        tie_weights=False,
        seq_len=16,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        threads=1,
        precision="fp32",
    )
    return TrainConfig(**{**base, **overrides})


# -- the time budget ------------------------------------------------------------------------------


def test_a_time_budget_is_used_when_no_epochs_are_given() -> None:
    events: list[TrainEvent] = []
    r = train(TINY_CORPUS, tiny(time_budget_s=3.0), on_event=events.append, progress_interval_s=0.2)
    m = r.metrics
    assert m["stopped_by"] == "time_budget"
    assert m["elapsed_s"] >= 0.9 * 3.0
    assert m["epoch_cap"] is None  # not DEFAULT_EPOCHS: only the budget ends the run
    # events name whole numbers of epochs and steps, the estimate at least what is done
    assert all(e.epochs >= e.epoch >= 1 and e.total_steps >= e.step for e in events if e.kind == "progress")


def test_explicit_epochs_cap_a_budgeted_run() -> None:
    r = train(TINY_CORPUS, tiny(epochs=2, time_budget_s=60.0))
    assert r.metrics["stopped_by"] == "epochs" and r.metrics["epochs"] == 2 and r.metrics["epoch_cap"] == 2


def test_without_a_budget_the_default_epochs_end_the_run() -> None:
    r = train(TINY_CORPUS, tiny())
    assert r.metrics["stopped_by"] == "epochs" and r.metrics["epochs"] == DEFAULT_EPOCHS


def test_early_stopping_still_ends_a_budgeted_run_and_says_so() -> None:
    r = train(TINY_CORPUS, tiny(lr=0.05, patience=2, hidden_dim=32, embedding_dim=32, time_budget_s=60.0))
    assert r.metrics["stopped_by"] == "early_stopping"
    assert r.metrics["elapsed_s"] < 60.0


def test_the_best_epoch_by_validation_loss_is_kept_without_patience() -> None:
    # a high learning rate on a 2-KB corpus overfits fast: validation gets worse after its best epoch
    events: list[TrainEvent] = []
    cfg = tiny(epochs=25, lr=0.05, hidden_dim=32, embedding_dim=32)
    r = train(TINY_CORPUS, cfg, on_event=events.append)
    vals = [e.val_loss for e in events if e.kind == "epoch"]
    assert len(vals) == 25 and vals[-1] > min(vals)  # the last epoch is not the best
    assert r.metrics["kept"] == "best"
    assert r.metrics["best_epoch"] == vals.index(min(vals)) + 1
    assert r.metrics["val_loss"] == pytest.approx(min(vals), rel=1e-5)


def test_each_epoch_after_the_first_starts_its_streams_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[tuple[int, torch.Tensor]] = []  # each pass over a split: its streams' length and first ids

    def spy(data: torch.Tensor, seq_len: int):  # noqa: ANN202 - lm.data.windows's iterator
        if data.dtype == torch.long:  # the ids, not a target mask
            starts.append((data.size(1), data[:, :4].clone()))
        return windows(data, seq_len)

    monkeypatch.setattr(loop, "windows", spy)
    train(TINY_CORPUS, tiny(epochs=3))
    longest = max(n for n, _ in starts)
    first, second, third = [s for n, s in starts if n == longest]  # validation's streams are shorter
    assert not torch.equal(second, first) and not torch.equal(third, second) and not torch.equal(third, first)


def test_epoch_offsets_are_drawn_from_the_seed_and_the_epoch() -> None:
    assert epoch_offset(1000, seed=1, epoch=0) == 0  # the first epoch starts where it always did
    offsets = [epoch_offset(1000, seed=1, epoch=e) for e in range(1, 6)]
    assert offsets == [epoch_offset(1000, seed=1, epoch=e) for e in range(1, 6)]  # a resumed run draws the same
    assert len(set(offsets)) > 1 and all(0 <= o < 1000 for o in offsets)
    assert offsets != [epoch_offset(1000, seed=2, epoch=e) for e in range(1, 6)]
    ids = torch.arange(10)
    assert rotate(ids, 3).tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]


# -- sizes fitted to the corpus and the budget ----------------------------------------------------


def test_the_default_recipe_stays_the_tuned_one_for_tiny_shakespeare_in_10_minutes() -> None:
    sizes, reason = fit_recipe(1_115_394, 65, "char", 600.0)
    assert sizes == {
        "vocab_size": None,
        "embedding_dim": 128,
        "hidden_dim": 512,
        "layers": 2,
        "dropout": 0.2,
        "tie_weights": False,
    }
    assert "512 units" in reason


def test_a_small_corpus_gets_a_much_smaller_model() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    big = planned_parameters(TrainConfig(time_budget_s=600), text[:1_115_394])
    small = planned_parameters(TrainConfig(time_budget_s=600), text[:50_000])
    assert big > 3_000_000 and small < big / 10
    sizes, _ = fit_recipe(50_000, 60, "char", 600.0)
    assert sizes["hidden_dim"] == 128 and sizes["dropout"] > 0.2  # many passes over little text: more dropout


def test_a_short_budget_gets_a_narrower_model() -> None:
    long_run, _ = fit_recipe(1_115_394, 65, "char", 600.0)
    short_run, reason = fit_recipe(1_115_394, 65, "char", 60.0)
    assert short_run["hidden_dim"] < long_run["hidden_dim"]
    assert "60 s" in reason


def test_the_word_vocabulary_is_capped() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:400_000]
    words = len(set(WORD_RE.findall(text)))
    cfg, choice = TrainConfig(tokenizer="word").fitted(text)
    assert cfg.vocab_size is not None and cfg.vocab_size < words
    assert choice is not None and "vocab_size" in choice["fitted"]
    assert cfg.tie_weights and cfg.embedding_dim == cfg.hidden_dim  # a large vocabulary: a tied embedding


def test_given_sizes_are_kept_and_the_others_follow_them() -> None:
    cfg, choice = TrainConfig(hidden_dim=64).fitted(TINY_CORPUS)
    assert cfg.hidden_dim == 64 and cfg.embedding_dim == 32 and cfg.layers == 2  # a quarter of the width, >= 32
    assert choice is not None and "hidden_dim" not in choice["fitted"] and choice["reason"]
    every = dict(vocab_size=100, embedding_dim=8, hidden_dim=8, layers=1, dropout=0.0, tie_weights=False)
    assert TrainConfig(**every).fitted(TINY_CORPUS) == (TrainConfig(**every), None)


def test_the_choice_and_its_reason_are_in_the_metrics() -> None:
    r = train(TINY_CORPUS, TrainConfig(seq_len=16, batch_size=4, epochs=1, threads=1, precision="fp32"))
    choice = r.metrics["recipe_choice"]
    assert choice["hidden_dim"] == r.config.hidden_dim == 128  # the narrowest width for 2 KB of text
    assert set(choice["fitted"]) == {"vocab_size", "embedding_dim", "hidden_dim", "layers", "dropout", "tie_weights"}
    assert "K characters" in choice["reason"]
    assert train(TINY_CORPUS, tiny(epochs=1, vocab_size=100)).metrics["recipe_choice"] is None  # every size given


# -- AWD-LSTM's regularisers ----------------------------------------------------------------------


def _model(dropout: float = 0.0, tie: bool = False) -> LSTMLanguageModel:
    torch.manual_seed(0)
    return LSTMLanguageModel(
        ModelConfig(20, embedding_dim=16, hidden_dim=16, layers=2, dropout=dropout, tie_weights=tie)
    )


IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
NATIVE = [pytest.param(True, id="textgen-kernel"), pytest.param(False, id="nn.LSTM")]


@pytest.mark.parametrize("native", NATIVE)
def test_weight_drop_changes_the_training_forward_not_the_eval_one(native: bool) -> None:
    model = _model()
    plain, _ = train_lstm.training_forward(model, torch.device("cpu"), native=native)
    dropped, kernel = train_lstm.training_forward(
        model, torch.device("cpu"), native=native, reg=train_lstm.Regularisation(weight_drop=0.5)
    )
    assert kernel == ("textgen" if native and train_lstm.usable(model, torch.device("cpu")) else "nn.LSTM")
    model.train()
    assert not torch.allclose(plain(IDS, None)[0], dropped(IDS, None)[0])
    logits, _, penalty = dropped(IDS, None)
    logits.sum().backward()
    grad = model.lstm.weight_hh_l0.grad
    assert grad is not None and 0.3 < float((grad == 0).float().mean()) < 0.7  # dropped weights get no gradient
    model.eval()
    assert torch.equal(plain(IDS, None)[0], dropped(IDS, None)[0]) and penalty is None


def test_locked_dropout_shares_one_mask_over_the_steps() -> None:
    x = torch.ones(6, 3, 8)  # (T, B, D)
    out = train_lstm._dropout(x, 0.5, training=True, locked=True)
    assert torch.equal(out, out[:1].expand_as(out)) and set(out.unique().tolist()) <= {0.0, 2.0}
    assert train_lstm._dropout(x, 0.5, training=False, locked=True) is x


def test_embedding_dropout_drops_whole_rows() -> None:
    weight = torch.ones(50, 4)
    out = train_lstm._drop_rows(weight, 0.5, training=True)
    rows = out.sum(dim=1)
    assert set(rows.unique().tolist()) <= {0.0, 8.0} and 0 < int((rows == 0).sum()) < 50


@pytest.mark.parametrize("native", NATIVE)
def test_ar_and_tar_add_a_penalty_in_training_only(native: bool) -> None:
    model = _model(dropout=0.1)
    reg = train_lstm.Regularisation(locked=True, embedding_drop=0.1, ar=2.0, tar=1.0)
    forward, _ = train_lstm.training_forward(model, torch.device("cpu"), native=native, reg=reg)
    model.train()
    _, _, penalty = forward(IDS, None)
    assert penalty is not None and penalty.requires_grad and float(penalty.detach()) > 0
    model.eval()
    assert forward(IDS, None)[2] is None


def test_the_ema_is_what_is_validated_kept_and_published(tmp_path: Path) -> None:
    cfg = tiny(epochs=2, ema=0.9, weight_drop=0.2, locked_dropout=True, embedding_dropout=0.1, ar=1.0, tar=1.0)
    r = train(TINY_CORPUS, cfg, state_dir=tmp_path / "state")
    saved = load_file(str(tmp_path / "state" / STATE_TENSORS))
    published = {k: v for k, v in r.model.state_dict().items()}
    raw = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    assert any(k.startswith("ema.") for k in saved)  # the resumable state holds the EMA
    assert not all(torch.equal(published[k], raw[k]) for k in raw)  # the EMA is not the raw weights
    assert all(torch.equal(published[k], saved[f"best.{k}"]) for k in raw)  # the best epoch's EMA is kept
    assert r.metrics["regularisation"] == {
        "weight_drop": 0.2,
        "locked_dropout": True,
        "embedding_dropout": 0.1,
        "ar": 1.0,
        "tar": 1.0,
        "ema": 0.9,
    }
    # serving loads it with no new keys (load_state_dict strict) and gets the same model
    registry = Registry(tmp_path / "models")
    registry.publish(r.model, r.tokenizer, model_id="awd", training={}, metrics=r.metrics)
    loaded = registry.load("awd").model
    assert all(torch.equal(v, published[k]) for k, v in loaded.state_dict().items())


def test_a_resumed_run_with_the_ema_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    cfg = tiny(epochs=3, dropout=0.2, ema=0.95, weight_drop=0.2)
    full = train(TINY_CORPUS, cfg)
    saved_epochs: list[int] = []

    def record(e: TrainEvent) -> None:
        if e.kind == "state_saved":
            saved_epochs.append(e.epoch)

    with pytest.raises(Exception, match="cancelled"):
        train(TINY_CORPUS, cfg, state_dir=tmp_path, on_event=record, should_stop=lambda: bool(saved_epochs))
    resumed = train(TINY_CORPUS, cfg, state_dir=tmp_path)
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    assert resumed.metrics["best_epoch"] == full.metrics["best_epoch"]
    for (name, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
