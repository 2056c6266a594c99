"""Training on chat and prompt/completion data: the loss counts the trainable tokens only."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lm.checkpoint import Checkpoint
from lm.data import encode_segments
from lm.errors import TrainingCancelled
from lm.formats import FormatError, segments
from lm.model import LSTMLanguageModel
from lm.tokenizers import fit_tokenizer
from lm.train import TrainConfig, TrainEvent, evaluate, evaluate_ids, train
from lm.train.evaluate import token_loss
from tests.corpora import CHAT_JSONL, TINY_CORPUS

from .test_train import tiny

TRAIN_CHAT = "".join(CHAT_JSONL.splitlines(keepends=True)[:32])
HELD_OUT_CHAT = "".join(CHAT_JSONL.splitlines(keepends=True)[32:])


def test_token_loss_is_the_mean_over_the_kept_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)  # (B, t, V)
    y = torch.tensor([[1, 2, 3], [4, 0, 1]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    lp = torch.log_softmax(logits, dim=-1)
    by_hand = -(lp[0, 0, 1] + lp[0, 2, 3] + lp[1, 2, 1]) / 3
    loss, counted = token_loss(logits, y, mask)
    assert counted == 3 and loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    total, _ = token_loss(logits, y, mask, reduction="sum")
    assert total.item() == pytest.approx(3 * by_hand.item(), rel=1e-6)
    plain, counted = token_loss(logits, y, None)
    assert counted == 6 and plain.item() == pytest.approx(-lp.gather(-1, y.unsqueeze(-1)).mean().item(), rel=1e-6)


def test_plain_text_has_no_mask() -> None:
    tokenizer = fit_tokenizer("char", TINY_CORPUS)
    ids, mask = encode_segments(tokenizer, segments(TINY_CORPUS, "text", None))
    assert mask is None and ids.tolist() == tokenizer.encode(TINY_CORPUS)


def test_the_assistant_only_validation_loss_is_a_hand_computation(
    make_tiny_model: Callable[..., LSTMLanguageModel],
) -> None:
    text = "".join(CHAT_JSONL.splitlines(keepends=True)[:3])
    pieces = segments(text, "chat", None)
    tokenizer = fit_tokenizer("char", "".join(piece for piece, _ in pieces))
    model = make_tiny_model(tokenizer.vocab_size)
    ids, mask = encode_segments(tokenizer, pieces)
    assert mask is not None and 0 < int(mask.sum()) < len(ids)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1], None)  # one stream, (1, N-1, V)
        lp = torch.log_softmax(logits[0].float(), dim=-1)
    targets = ids[1:]
    nll = -lp[torch.arange(len(targets)), targets]  # (N-1,)
    by_hand = nll[mask[1:]].mean().item()  # the assistant's tokens (and the stops after them) only
    assert evaluate_ids(model, ids[None], 16, mask=mask[None]) == pytest.approx(by_hand, rel=1e-5)
    assert evaluate_ids(model, ids[None], 16) == pytest.approx(nll.mean().item(), rel=1e-5)  # every token
    scored = evaluate(model, tokenizer, text, batch_size=1, data_format="chat")
    assert scored["loss"] == pytest.approx(by_hand, rel=1e-5) and scored["tokens"] == int(mask[1:].sum())


def test_training_on_chat_validates_on_the_held_out_conversations() -> None:
    cfg = tiny(data_format="chat", epochs=2, dropout=0.0)
    result = train(TRAIN_CHAT, cfg, val_text=HELD_OUT_CHAT)
    held_out = evaluate(result.model, result.tokenizer, HELD_OUT_CHAT, data_format="chat", batch_size=cfg.batch_size)
    assert result.metrics["val_loss"] == pytest.approx(held_out["loss"], rel=1e-5)
    assert math.log(result.tokenizer.vocab_size) > result.metrics["val_loss"]  # better than uniform
    assert result.config.data_format == "chat" and result.chat_template is None
    # the tokenizer is fitted on the rendered conversations, not on the JSON
    assert "{" not in result.tokenizer.decode(list(range(result.tokenizer.vocab_size)))


def test_a_resumed_chat_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    cfg = tiny(data_format="chat", epochs=3, dropout=0.2)
    full = train(TRAIN_CHAT, cfg, val_text=HELD_OUT_CHAT)
    saved: list[int] = []

    def record(event: TrainEvent) -> None:
        if event.kind == "state_saved":
            saved.append(event.epoch)

    with pytest.raises(TrainingCancelled):  # stopped during epoch 2: the state holds epoch 1
        train(
            TRAIN_CHAT,
            cfg,
            val_text=HELD_OUT_CHAT,
            state_dir=tmp_path,
            on_event=record,
            should_stop=lambda: bool(saved),
        )
    resumed = train(TRAIN_CHAT, cfg, val_text=HELD_OUT_CHAT, state_dir=tmp_path)
    assert resumed.metrics["steps"] == full.metrics["steps"]
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    for (name, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_window_of_context_only_makes_no_step() -> None:
    long_question = "Say, what news? " * 12  # 192 characters of context before each short answer
    text = "".join(
        json.dumps({"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Ay."}]})
        + "\n"
        for _ in range(12)
    )
    cfg = tiny(data_format="chat", epochs=1, batch_size=1, seq_len=16, val_fraction=0.2)
    result = train(text, cfg)
    windows = (len("".join(piece for piece, _ in segments(text, "chat", None))) * 0.8 - 1) / 16
    assert 0 < result.metrics["steps"] < windows / 2  # most windows hold the question only: no step
    assert math.isfinite(result.metrics["val_loss"])


def test_a_fine_tune_renders_with_the_base_models_chat_template() -> None:
    first = train(TINY_CORPUS, tiny(epochs=1))
    template = {"user": "Q: ", "assistant": "A: ", "separator": "\n", "stop": ["\nQ:"]}
    base = Checkpoint("base", first.model, first.tokenizer, {"chat_template": template})
    result = train(TRAIN_CHAT, tiny(data_format="chat", epochs=1), val_text=HELD_OUT_CHAT, base=base)
    assert result.chat_template == template
    held_out = evaluate(
        result.model, result.tokenizer, HELD_OUT_CHAT, data_format="chat", chat_template=template, batch_size=4
    )
    assert result.metrics["val_loss"] == pytest.approx(held_out["loss"], rel=1e-5)


def test_prompt_completion_data_trains() -> None:
    lines = [line for line in TINY_CORPUS.splitlines() if line.strip()]
    text = "".join(
        json.dumps({"prompt": a + "\n", "completion": b}) + "\n" for a, b in zip(lines, lines[1:], strict=False)
    )
    result = train(text, tiny(data_format="completion", epochs=1, val_fraction=0.2))
    assert math.isfinite(result.metrics["val_loss"]) and result.metrics["steps"] > 0


def test_data_in_another_format_is_refused() -> None:
    with pytest.raises(FormatError, match="line 1: not valid JSON"):
        train(TINY_CORPUS, tiny(data_format="chat"))
    with pytest.raises(FormatError, match='line 2: message 1 has no "role"'):
        train(TRAIN_CHAT, tiny(data_format="chat"), val_text='\n{"messages": [{}]}\n')


def test_an_unknown_data_format_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="data_format must be one of text, chat, completion"):
        TrainConfig(data_format="xml").validate()  # type: ignore[arg-type]
