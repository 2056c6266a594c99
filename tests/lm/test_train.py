"""The training loop on a 2-KB corpus with a 16-unit LSTM: what a user of `lm.train` sees."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lm.data import batchify, decode_corpus, read_corpus, split_corpus, windows
from lm.errors import ConfigError, CorpusError, TrainingCancelled
from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import Registry
from lm.tokenizers import fit_tokenizer
from lm.train import STATE_JSON, TrainConfig, TrainEvent, evaluate, lr_at, planned_parameters, score_ids, train
from tests.corpora import CHAT_JSONL

from .conftest import CHINESE_CORPUS, TINY_CORPUS


def tiny(**overrides) -> TrainConfig:
    base = dict(
        embedding_dim=16,
        hidden_dim=16,
        layers=2,
        seq_len=16,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        epochs=2,
        threads=1,
        precision="fp32",
    )
    return TrainConfig(**{**base, **overrides})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_falls_within_seconds() -> None:
    events: list[TrainEvent] = []
    cfg = tiny(epochs=12, embedding_dim=32, hidden_dim=32, lr=3e-2, dropout=0.0)
    result = train(TINY_CORPUS, cfg, on_event=events.append, progress_interval_s=0)
    epochs = [e for e in events if e.kind == "epoch"]
    assert len(epochs) == 12
    first, last = epochs[0], epochs[-1]
    assert last.train_loss is not None and first.train_loss is not None
    assert last.train_loss < first.train_loss - 0.5
    assert math.log(result.tokenizer.vocab_size) > result.metrics["val_loss"]  # better than uniform
    assert result.metrics["epochs"] == 12 and result.metrics["stopped_by"] == "epochs"


def test_metrics_are_consistent() -> None:
    m = train(TINY_CORPUS, tiny(epochs=1)).metrics
    assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["val_bits_per_token"] == pytest.approx(m["val_loss"] / math.log(2))
    assert m["val_bits_per_char"] == pytest.approx(m["val_bits_per_token"])  # char tokenizer: 1 token = 1 char
    assert m["tokens"] > 0 and m["steps"] > 0 and m["tokens_per_s"] > 0


def test_same_seed_same_model_other_seed_differs() -> None:
    a = train(TINY_CORPUS, tiny(seed=7))
    b = train(TINY_CORPUS, tiny(seed=7))
    c = train(TINY_CORPUS, tiny(seed=8))
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    assert all(torch.equal(x, y) for x, y in zip(weights(a.model).values(), weights(b.model).values(), strict=True))
    assert a.metrics["val_loss"] != c.metrics["val_loss"]


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = tiny(epochs=3, dropout=0.2)
    full = train(TINY_CORPUS, cfg)
    # The process dies during epoch 2: the state folder holds epoch 1; a new run picks it up.
    saved_epochs: list[int] = []

    def record(e: TrainEvent) -> None:
        if e.kind == "state_saved":
            saved_epochs.append(e.epoch)

    with pytest.raises(TrainingCancelled):
        train(TINY_CORPUS, cfg, state_dir=tmp_path, on_event=record, should_stop=lambda: bool(saved_epochs))
    saved = json.loads((tmp_path / STATE_JSON).read_text())
    assert saved["progress"]["epoch"] == 1
    events: list[TrainEvent] = []
    resumed = train(TINY_CORPUS, cfg, state_dir=tmp_path, on_event=events.append)
    assert [e.epoch for e in events if e.kind == "epoch"] == [2, 3]  # epoch 1 was not trained again
    assert resumed.metrics["steps"] == full.metrics["steps"]
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    for (name, x), y in zip(weights(full.model).items(), weights(resumed.model).values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("data_format", ["text", "chat"])
def test_a_run_stopped_mid_epoch_saves_its_state_there_and_resumes_to_the_uninterrupted_result(
    tmp_path: Path, data_format: str
) -> None:
    """A pause (or a hand-back) mid-epoch: the state is saved at the step it stopped at, the carried LSTM
    state and the epoch's loss so far included, and the resumed run trains no step twice."""
    text = TINY_CORPUS if data_format == "text" else CHAT_JSONL
    cfg = tiny(epochs=2, dropout=0.2, data_format=data_format)
    full = train(text, cfg)
    steps: list[int] = []

    def record(e: TrainEvent) -> None:
        if e.kind == "progress":
            steps.append(e.step)

    stop_at = full.metrics["steps"] * 3 // 4  # in the second epoch
    with pytest.raises(TrainingCancelled):
        train(
            text,
            cfg,
            state_dir=tmp_path,
            on_event=record,
            progress_interval_s=0,
            should_stop=lambda: steps[-1:] == [stop_at],
        )
    saved = json.loads((tmp_path / STATE_JSON).read_text())["progress"]
    assert (saved["epoch"], saved["step"]) == (1, stop_at) and saved["window"] > 0
    events: list[TrainEvent] = []
    resumed = train(text, cfg, state_dir=tmp_path, on_event=events.append, progress_interval_s=0)
    assert [e.step for e in events if e.kind == "progress"][0] == stop_at + 1  # no step trained twice
    assert [e.epoch for e in events if e.kind == "epoch"] == [2]
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], rel=1e-6)
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    for (name, x), y in zip(weights(full.model).items(), weights(resumed.model).values(), strict=True):
        assert torch.equal(x, y), name


def test_resume_refuses_another_corpus(tmp_path: Path) -> None:
    train(TINY_CORPUS, tiny(epochs=1), state_dir=tmp_path)
    with pytest.raises(CorpusError, match="different corpus"):
        train(TINY_CORPUS + "More words.\n", tiny(epochs=2), state_dir=tmp_path)


def test_max_steps_and_time_budget_stop_training() -> None:
    r = train(TINY_CORPUS, tiny(epochs=50, max_steps=5))
    assert r.metrics["steps"] == 5 and r.metrics["stopped_by"] == "max_steps"
    r = train(TINY_CORPUS, tiny(epochs=10_000, time_budget_s=1.0))
    assert r.metrics["stopped_by"] == "time_budget"
    assert r.metrics["elapsed_s"] < 5.0


def test_early_stopping_keeps_the_best_epoch() -> None:
    # A high learning rate on a tiny corpus overfits fast, so validation stops improving.
    events: list[TrainEvent] = []
    r = train(TINY_CORPUS, tiny(epochs=60, lr=0.05, patience=2, dropout=0.0), on_event=events.append)
    vals = [e.val_loss for e in events if e.kind == "epoch"]
    assert r.metrics["stopped_by"] == "early_stopping"
    assert len(vals) < 60
    assert r.metrics["val_loss"] == pytest.approx(min(vals), rel=1e-5)


def test_progress_events_report_rate_and_eta() -> None:
    events: list[TrainEvent] = []
    train(TINY_CORPUS, tiny(epochs=2), on_event=events.append, progress_interval_s=0)
    progress = [e for e in events if e.kind == "progress"]
    assert progress and all(e.tokens_per_s > 0 for e in progress)
    assert all(e.total_steps == progress[0].total_steps for e in progress)
    assert progress[-1].eta_s is not None and progress[-1].eta_s >= 0
    assert [e.step for e in progress] == sorted(e.step for e in progress)
    epoch_events = [e for e in events if e.kind == "epoch"]
    assert all(e.sample for e in epoch_events)  # each epoch reports a short generated sample


def test_cancellation_stops_promptly() -> None:
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(TrainingCancelled):
        train(TINY_CORPUS, tiny(epochs=100), should_stop=should_stop)
    assert calls["n"] == 4


def test_state_saved_each_epoch(tmp_path: Path) -> None:
    events: list[TrainEvent] = []
    train(TINY_CORPUS, tiny(epochs=2), state_dir=tmp_path, on_event=events.append)
    assert [e.epoch for e in events if e.kind == "state_saved"] == [1, 2]
    assert {p.name for p in tmp_path.iterdir()} == {"train_state.safetensors", "train_state.json", "tokenizer.json"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_dim", 0),
        ("layers", 9),
        ("dropout", 0.95),
        ("lr", 2.0),
        ("seq_len", 1),
        ("batch_size", 0),
        ("val_fraction", 0.9),
        ("epochs", 0),
        ("tokenizer", "morse"),
        ("precision", "fp8"),
        ("threads", 0),
    ],
)
def test_out_of_bounds_hyperparameters_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        tiny(**{field: value}).validate()
    assert err.value.param == field
    assert field in str(err.value)


def test_tie_weights_needs_equal_dims() -> None:
    with pytest.raises(ConfigError, match="tie_weights"):
        tiny(embedding_dim=8, hidden_dim=16, tie_weights=True).validate()


def test_corpus_shorter_than_one_batch_is_refused() -> None:
    with pytest.raises(CorpusError, match="shorter than one batch"):
        train("short text, few tokens", tiny(batch_size=64))


@pytest.mark.parametrize("text", ["", "   \n\n  "])
def test_empty_corpus_is_refused(text: str) -> None:
    with pytest.raises(CorpusError, match="empty"):
        train(text, tiny())


def test_binary_and_non_utf8_bytes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="binary"):
        decode_corpus(b"\x00\x01\x02ELF" * 100)
    with pytest.raises(CorpusError, match="UTF-8"):
        decode_corpus("café".encode("latin-1"))
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "ok.txt").write_bytes("\ufeffhello world\n".encode())
    assert read_corpus(tmp_path / "ok.txt") == "hello world\n"  # a byte-order mark is dropped


def test_chinese_corpus_trains_with_char_tokenizer() -> None:
    r = train(CHINESE_CORPUS * 4, tiny(epochs=2, batch_size=2))
    assert "道" in r.tokenizer.decode(r.tokenizer.encode("道"))
    assert math.isfinite(r.metrics["val_loss"])


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_word_and_bpe_tokenizers_train(kind: str) -> None:
    vocab = 300 if kind == "bpe" else None
    r = train(TINY_CORPUS * 3, tiny(tokenizer=kind, vocab_size=vocab, batch_size=2, epochs=1))
    assert r.tokenizer.kind == kind
    assert math.isfinite(r.metrics["val_loss"])
    # bits per char is per character, so word/bpe models are comparable with char ones
    assert r.metrics["val_bits_per_char"] < r.metrics["val_bits_per_token"]


def test_fine_tune_keeps_the_base_tokenizer_and_architecture(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    base = train(TINY_CORPUS, tiny(epochs=1))
    registry.publish(base.model, base.tokenizer, model_id="base", training={}, metrics=base.metrics)
    checkpoint = registry.load("base")
    tuned = train("Summer's lease hath all too short a date.\n" * 40, tiny(epochs=1, hidden_dim=64), base=checkpoint)
    assert tuned.tokenizer.to_dict() == checkpoint.tokenizer.to_dict()
    assert tuned.config.hidden_dim == 16  # the base model's, not the flag's
    pairs = zip(weights(tuned.model).values(), weights(checkpoint.model).values(), strict=True)
    assert not all(torch.equal(x, y) for x, y in pairs)


def test_evaluate_reports_loss_perplexity_bits_per_char() -> None:
    r = train(TINY_CORPUS, tiny(epochs=1))
    report = evaluate(r.model, r.tokenizer, TINY_CORPUS[:500])
    assert set(report) == {"tokens", "chars", "loss", "perplexity", "bits_per_char"}
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["bits_per_char"] == pytest.approx(report["loss"] / math.log(2), rel=0.01)
    assert 400 < report["tokens"] <= 500


def test_score_ids_is_evaluate_loss_token_by_token() -> None:
    """Prompt scoring (lm.train.score_ids) over eval's streams gives eval's loss; ragged prompts in one
    batch, over several windows, score as each alone does; a prompt's first token has no score."""
    r = train(TINY_CORPUS, tiny(epochs=1))
    model = r.model.eval()
    text = TINY_CORPUS[:700]
    report = evaluate(model, r.tokenizer, text)
    rows = batchify(torch.tensor(r.tokenizer.encode(text)), 16).tolist()
    scores = score_ids(model, rows, 3, seq_len=8)  # windows of 8: the state is carried across them
    nll = -sum(float(chosen.sum()) for chosen, _, _ in scores)
    assert sum(len(chosen) for chosen, _, _ in scores) == report["tokens"]
    assert nll / report["tokens"] == pytest.approx(report["loss"], abs=1e-5)

    prompts = [rows[0][:5], rows[1], [], rows[2][:1], rows[3][:20]]
    batched = score_ids(model, prompts, 3, seq_len=8)
    for prompt, (chosen, values, ids) in zip(prompts, batched, strict=True):
        assert chosen.shape == (max(0, len(prompt) - 1),) and values.shape == ids.shape == (len(chosen), 3)
        if len(prompt) > 1:
            alone, alone_values, alone_ids = score_ids(model, [prompt], 3)[0]
            assert torch.allclose(chosen, alone, atol=1e-5) and torch.allclose(values, alone_values, atol=1e-5)
            assert torch.all(values[:, 0] >= chosen - 1e-6)  # the likeliest is at least the chosen one
    assert score_ids(model, [], 2) == []
    with pytest.raises(ValueError, match="eval mode"):
        score_ids(model.train(), prompts, 1)


def test_split_is_by_position_and_batches_are_contiguous() -> None:
    ids = torch.arange(100)
    train_ids, val_ids = split_corpus(ids, 0.1)
    assert train_ids.tolist() == list(range(90)) and val_ids.tolist() == list(range(90, 100))
    data = batchify(train_ids, 3)  # (3, 30): row b is one contiguous stream
    assert data.shape == (3, 30) and data[1].tolist() == list(range(30, 60))
    pairs = list(windows(data, 8))
    assert torch.equal(pairs[0][1][:, :-1], pairs[0][0][:, 1:])  # y is x shifted by one
    assert torch.equal(pairs[1][0][:, 0], pairs[0][0][:, -1] + 1)  # the next window continues the stream


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    cfg = tiny(lr=1.0, warmup_steps=10)
    assert lr_at(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 100, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 20, 100, time_fraction=1.0) == pytest.approx(0.1)  # a spent time budget decays fully


def test_validation_every_so_many_seconds() -> None:
    events: list[TrainEvent] = []
    train(TINY_CORPUS, tiny(epochs=10_000, time_budget_s=1.5), on_event=events.append, val_every_s=0.5)
    marks = [e for e in events if e.kind == "validation"]
    assert len(marks) >= 2
    assert all(e.val_loss is not None and math.isfinite(e.val_loss) for e in marks)
    assert [round(e.elapsed_s / 0.5) for e in marks] == sorted(round(e.elapsed_s / 0.5) for e in marks)


SHIPPED = Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "shakespeare.txt"


@pytest.mark.parametrize(
    "sizes",
    [
        {},  # every size fitted to the corpus (lm/train/sizing.py)
        {"embedding_dim": 24, "hidden_dim": 32, "layers": 3},
        {"embedding_dim": 16, "hidden_dim": 16, "layers": 1, "tie_weights": True, "vocab_size": 300},
    ],
    ids=["defaults", "explicit", "tied-and-capped"],
)
@pytest.mark.parametrize("tokenizer", ["char", "word", "bpe"])
def test_planned_parameters_equal_the_built_models_parameter_count(tokenizer: str, sizes: dict) -> None:
    text = SHIPPED.read_text(encoding="utf-8")[:300_000]  # enough pairs for bpe to reach its 1024 tokens
    cfg, _ = TrainConfig(tokenizer=tokenizer, **sizes).fitted(text)  # the sizes not given, as train() fits them
    fitted = fit_tokenizer(tokenizer, text, cfg.vocab_size)
    built = LSTMLanguageModel(cfg.model_config(fitted.vocab_size))
    assert planned_parameters(cfg, text) == sum(p.numel() for p in set(built.parameters()))


def test_the_default_recipe_plans_the_shipped_models_size() -> None:
    """shakespeare-char was trained by the default recipe on the shipped corpus: the plan is its size."""
    shipped = json.loads((SHIPPED.parents[2] / "models" / "shakespeare-char" / "config.json").read_text())
    assert planned_parameters(TrainConfig(), SHIPPED.read_text(encoding="utf-8")) == shipped["parameters"] == 3_469_908


def test_planned_parameters_of_a_fine_tune_follow_the_base_architecture() -> None:
    base = {"vocab_size": 70, "embedding_dim": 12, "hidden_dim": 20, "layers": 2, "dropout": 0.1, "tie_weights": False}
    built = LSTMLanguageModel(ModelConfig.from_dict(base))
    assert planned_parameters(TrainConfig(), "any text", base) == sum(p.numel() for p in built.parameters())
