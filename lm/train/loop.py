"""The training loop: truncated BPTT over contiguous streams, AdamW, per-epoch validation.

Shaped after pytorch/examples word_language_model (carry the hidden state, detach between
windows) and nanoGPT's train.py (AdamW, warmup + cosine decay, gradient clipping, bf16
autocast). Resumable state is written at each epoch end (lm/train/state.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lm.data import batchify, check_text, encode_segments, epoch_offset, num_windows, rotate, split_corpus, windows
from lm.devices import resolve_device
from lm.errors import ConfigError, CorpusError, TrainingCancelled
from lm.formats import DataFormat, segments
from lm.kernels import train_lstm
from lm.model import LSTMLanguageModel, State
from lm.tokenizers import Tokenizer, fit_tokenizer, load_tokenizer
from lm.train.config import TrainConfig
from lm.train.evaluate import evaluate_ids, sample_text, token_loss
from lm.train.state import STATE_JSON, STATE_TOKENIZER, Progress, load_averaged, load_state, save_state

if TYPE_CHECKING:
    from lm.checkpoint import Checkpoint

log = logging.getLogger(__name__)

UNCAPPED_STEPS = 2**62  # the step count of a run that only its time budget ends (lr_at then follows time)


@dataclass
class TrainEvent:
    kind: str  # "progress" | "validation" | "epoch" | "state_saved"
    epoch: int  # 1-based epoch being trained (or just finished, for "epoch")
    epochs: int
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    eta_s: float | None
    elapsed_s: float  # training time, the resumed state's included (what time_budget_s counts)
    lr: float | None = None
    sample: str | None = None
    session_elapsed_s: float = 0.0  # this call of train()'s share of elapsed_s (a resume starts at 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: LSTMLanguageModel
    tokenizer: Tokenizer
    config: TrainConfig
    metrics: dict[str, Any]
    corpus_sha256: str
    corpus_bytes: int
    history: list[dict[str, Any]] = field(default_factory=list)
    chat_template: dict[str, Any] | None = None  # the base model's, which chat data was rendered with
    # the held-out tokens the model was validated on, as `evaluate_ids` takes them (CPU): (B, T) ids and
    # their target mask (None: every target counts); worker/publish.py's quality gate scores the active
    # model on the same tokens
    val_data: Tensor | None = None
    val_targets: Tensor | None = None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse in this process instead of returning it.

    A training step allocates and frees the same few hundred MB every step (activations saved for
    the backward, gradients, products). By default glibc serves blocks over its mmap threshold with
    fresh pages and gives back the top of the heap when it frees, so every step pays again in page
    faults: 7,000-38,000 a step for the default recipe, 5-15% of the step (docs/TRAINING.md,
    "The training kernel"). With the threshold at its maximum (32 MB) and trimming off, the pages stay mapped
    and are reused; the process keeps its peak working set, which a training process does anyway.
    The same is what jemalloc or tcmalloc would do. No-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware has native bf16 (AVX512-BF16/AMX on CPU, Ampere+ on CUDA)."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and not supported:
        log.warning("bf16 was asked for but %s has no native bf16; training in fp32", device)
    return supported


def lr_at(cfg: TrainConfig, step: int, total_steps: int, time_fraction: float = 0.0) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak (nanoGPT's schedule).

    Under a time budget the decay follows whichever is further along: steps or time.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max((step - cfg.warmup_steps) / span, time_fraction))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    text: str,
    cfg: TrainConfig,
    *,
    on_event: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    state_dir: Path | str | None = None,
    base: Checkpoint | None = None,
    progress_interval_s: float = 2.0,
    val_every_s: float | None = None,
    native: bool = True,
    val_text: str | None = None,
) -> TrainResult:
    """Train a model on `text`. Resumes from `state_dir` when it holds a saved epoch state.

    `text` is in `cfg.data_format` (lm/formats.py): chat and prompt/completion data are rendered (with the
    base model's chat template) and the loss counts their trainable tokens only, in training and in
    validation. `val_text` (same format) validates instead of the last `cfg.val_fraction` of `text`.
    `val_every_s` adds "validation" events every so many seconds of training, besides the
    per-epoch ones (useful when one epoch is long). `native` (the `TEXTGEN_NATIVE` setting) lets the
    LSTM train through textgen's own kernel (lm/kernels/train_lstm.py); False trains nn.LSTM.
    """
    cfg.validate()
    check_text(text)
    if val_text is not None:
        check_text(val_text, "the validation text")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    corpus_sha = sha256_text(text)
    chat_template = base.config.get("chat_template") if base is not None else None
    fmt = cfg.data_format
    pieces = segments(text, fmt, chat_template)
    state_path = Path(state_dir) if state_dir else None
    resuming = state_path is not None and (state_path / STATE_JSON).is_file()

    recipe_choice: dict[str, Any] | None = None
    if base is None:  # sizes not given are fitted to the corpus and the budget (lm/train/sizing.py)
        cfg, recipe_choice = cfg.fitted("".join(piece for piece, _ in pieces))
    torch.manual_seed(cfg.seed)
    if resuming:
        assert state_path is not None
        tokenizer = load_tokenizer(state_path / STATE_TOKENIZER)
    elif base is not None:
        tokenizer = base.tokenizer
    else:
        tokenizer = fit_tokenizer(cfg.tokenizer, "".join(piece for piece, _ in pieces), cfg.vocab_size)
    if base is not None:
        cfg = _adopt_architecture(cfg, base)

    split = _split(tokenizer, pieces, val_text, fmt, chat_template, cfg)
    (train_ids, train_mask), (val_ids, val_mask) = split
    _check_corpus_size(len(train_ids), len(val_ids), cfg)
    _check_trainable(train_mask, val_mask)
    val_rows = min(cfg.batch_size, len(val_ids) // 2)
    train_data = batchify(train_ids, cfg.batch_size).to(device)  # (B, N)
    val_data = batchify(val_ids, val_rows).to(device)
    train_targets = batchify(train_mask, cfg.batch_size).to(device) if train_mask is not None else None  # (B, N)
    val_targets = batchify(val_mask, val_rows).to(device) if val_mask is not None else None
    scored_val = val_ids if val_mask is None else val_ids[val_mask]
    val_chars_per_token = len(tokenizer.decode(scored_val.tolist())) / max(1, len(scored_val))

    model = LSTMLanguageModel(cfg.model_config(tokenizer.vocab_size))
    if base is not None:
        model.load_state_dict(base.model.state_dict())
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay, fused=device.type == "cpu"
    )
    prog = Progress()
    best_weights: dict[str, Tensor] | None = None
    carry: State | None = None
    if resuming:
        assert state_path is not None
        prog, best_weights, carry = load_state(state_path, cfg, corpus_sha, model, optimizer)
        if carry is not None:
            carry = (carry[0].to(device), carry[1].to(device))

    steps_per_epoch = num_windows(train_data, cfg.seq_len)
    epoch_cap = cfg.epoch_cap()  # None: a time budget and no epochs given; the budget ends the run
    total_steps = epoch_cap * steps_per_epoch if epoch_cap is not None else UNCAPPED_STEPS
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    loop = _Loop(
        cfg, model, optimizer, train_data, bf16, total_steps, prog, on_event, should_stop, progress_interval_s, native
    )
    loop.targets = train_targets  # (B, N) bool beside train_data, or None: every target counts
    loop.train_ids, loop.train_mask = train_ids.to(device), train_mask.to(device) if train_mask is not None else None
    loop.steps_per_epoch = steps_per_epoch
    if resuming:
        assert state_path is not None
        loop.restore_average(load_averaged(state_path))
    loop.carry = carry

    def save(carry: State | None = None) -> None:
        """The resumable state as it is now (`carry`: the LSTM state of a save mid-epoch)."""
        assert state_path is not None
        save_state(
            state_path, cfg, corpus_sha, tokenizer, model, optimizer, prog, best_weights,
            carry=carry, averaged=loop.averaged_weights(),
        )  # fmt: skip

    def save_on_stop(state: State | None) -> None:
        """Stopped mid-epoch (a job paused or handed back): save where it is, so a resume loses no step."""
        if state_path is not None and prog.window > 0:
            save(state)
            loop.emit("state_saved", train_loss=loop.recent_loss)

    loop.on_stop = save_on_stop
    if val_every_s:
        loop.validate_every(val_every_s, val_data, val_targets)

    stopped_by = "epochs"
    last_train_loss: float | None = None
    while epoch_cap is None or prog.epoch < epoch_cap:
        epoch_loss, stop_reason = loop.run_epoch()
        last_train_loss = epoch_loss if epoch_loss is not None else last_train_loss
        if epoch_loss is None:  # no step ran this epoch: a limit was already reached
            stopped_by = stop_reason or stopped_by
            break
        with loop.averaged():  # the EMA's weights, when cfg.ema is set: those are validated and kept
            # in the training's precision (bf16: half the time of fp32, which the budget then trains with);
            # the kept model's val_loss is measured once more in fp32 at the end
            val = evaluate_ids(model, val_data, cfg.seq_len, bf16=bf16, mask=val_targets)
            prog.epoch += 1
            improved = prog.best_val is None or val < prog.best_val
            if improved:  # the model kept is the best by validation loss
                prog.best_val, prog.bad_epochs, prog.best_epoch = val, 0, prog.epoch
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not improved:
            prog.bad_epochs += 1
        prog.history.append({"epoch": prog.epoch, "step": prog.step, "train_loss": epoch_loss, "val_loss": val})
        loop.emit("epoch", train_loss=epoch_loss, val_loss=val, sample=sample_text(model, tokenizer, cfg.seed))
        if state_path is not None:
            save()
            loop.emit("state_saved", train_loss=epoch_loss, val_loss=val)
        if stop_reason is not None:
            stopped_by = stop_reason
            break
        if cfg.patience is not None and prog.bad_epochs >= cfg.patience:
            stopped_by = "early_stopping"
            break

    if best_weights is not None:
        model.load_state_dict(best_weights)  # the best epoch's weights (the EMA's, under cfg.ema)
    model.eval()
    val_loss = evaluate_ids(model, val_data, cfg.seq_len, bf16=False, mask=val_targets)
    metrics = _metrics(last_train_loss, val_loss, val_chars_per_token, prog, stopped_by, loop.kernel)
    metrics.update(_recipe_metrics(cfg, prog, best_weights is not None, recipe_choice))
    log.info("training done: %s", json.dumps(metrics))
    return TrainResult(
        model=model.cpu(),
        tokenizer=tokenizer,
        config=cfg,
        metrics=metrics,
        corpus_sha256=corpus_sha,
        corpus_bytes=len(text.encode("utf-8")),
        history=prog.history,
        chat_template=chat_template,
        val_data=val_data.cpu(),
        val_targets=val_targets.cpu() if val_targets is not None else None,
    )


class _Loop:
    """One epoch of truncated BPTT at a time, with progress events and limits."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: LSTMLanguageModel,
        optimizer: torch.optim.Optimizer,
        data: Tensor,
        bf16: bool,
        total_steps: int,
        prog: Progress,
        on_event: Callable[[TrainEvent], None] | None,
        should_stop: Callable[[], bool] | None,
        interval_s: float,
        native: bool,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.data = cfg, model, optimizer, data
        self.bf16, self.total_steps, self.prog = bf16, total_steps, prog
        self.on_event, self.should_stop, self.interval_s = on_event, should_stop, interval_s
        reg = train_lstm.Regularisation(cfg.weight_drop, cfg.locked_dropout, cfg.embedding_dropout, cfg.ar, cfg.tar)
        self.forward, self.kernel = train_lstm.training_forward(model, data.device, native=native, reg=reg)
        log.info("training the LSTM with %s's kernel", self.kernel)
        self.steps_per_epoch = 1  # set by train(): the windows of one pass, for the events of an uncapped run
        self.params = list(model.parameters())  # tied weights once
        # the EMA of the weights (cfg.ema), validated and kept instead of the raw ones; None: off
        self.ema: list[Tensor] | None = [p.detach().clone() for p in self.params] if cfg.ema else None
        self.started = time.perf_counter() - prog.elapsed_s
        self.session_start = time.perf_counter()
        self.session_start_step = prog.step
        self.session_tokens = 0
        self.last_report = 0.0
        self.recent_loss: float | None = None
        self.lr: float | None = None
        self.val_every_s: float | None = None
        self.val_data: Tensor | None = None
        self.val_targets: Tensor | None = None
        self.targets: Tensor | None = None  # (B, N) bool: which targets the loss counts; None = every one
        self.train_ids: Tensor | None = None  # (N,) the training split, which each epoch's streams are cut from
        self.train_mask: Tensor | None = None  # (N,) bool beside it, or None
        self.carry: State | None = None  # the LSTM state to start the epoch's next window with (a mid-epoch resume)
        self.on_stop: Callable[[State | None], None] | None = None  # called with the carried state when stopped
        self.next_val_s = math.inf

    def validate_every(self, seconds: float, val_data: Tensor, val_targets: Tensor | None = None) -> None:
        self.val_every_s, self.val_data, self.val_targets = seconds, val_data, val_targets
        self.next_val_s = (self.elapsed() // seconds + 1) * seconds

    def maybe_validate(self) -> None:
        if self.val_every_s is None or self.val_data is None or self.elapsed() < self.next_val_s:
            return
        with self.averaged():  # the weights the run would keep
            val = evaluate_ids(self.model, self.val_data, self.cfg.seq_len, bf16=self.bf16, mask=self.val_targets)
        self.emit("validation", train_loss=self.recent_loss, val_loss=val)
        self.next_val_s += self.val_every_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def limit_reached(self) -> str | None:
        if self.cfg.max_steps is not None and self.prog.step >= self.cfg.max_steps:
            return "max_steps"
        if self.cfg.time_budget_s is not None and self.elapsed() >= self.cfg.time_budget_s:
            return "time_budget"
        return None

    def run_epoch(self) -> tuple[float | None, str | None]:
        """Returns (mean train loss of the epoch or None if no step ran, the limit that stopped it)."""
        cfg, model, prog = self.cfg, self.model, self.prog
        model.train()
        self.shift_streams(prog.epoch)
        state, self.carry = self.carry, None  # a resumed epoch goes on from its saved window and state
        masks = windows(self.targets, cfg.seq_len) if self.targets is not None else None
        for i, (x, y) in enumerate(windows(self.data, cfg.seq_len)):
            target_mask = next(masks)[1] if masks is not None else None  # (B, t) or None
            if i < prog.window:
                continue
            if self.should_stop is not None and self.should_stop():
                if self.on_stop is not None:
                    self.on_stop(state)
                raise TrainingCancelled("training was cancelled")
            reason = self.limit_reached()
            if reason is not None:
                return self._end_epoch(), reason
            budget_fraction = self.elapsed() / cfg.time_budget_s if cfg.time_budget_s else 0.0
            self.lr = lr_at(cfg, self.prog.step, self.total_steps, budget_fraction)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits, state, penalty = self.forward(x, state)  # (B, t, V); AR/TAR's penalty, or None
            loss, counted = token_loss(logits, y, target_mask)  # the mean over the targets the mask keeps
            state = (state[0].detach(), state[1].detach())  # detach: truncated BPTT
            prog.window += 1
            if counted == 0:  # a window of context only (a long prompt): nothing to learn, carry the state on
                continue
            self.optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.update_average()
            value = loss.item()
            if not math.isfinite(value):
                raise ConfigError(f"training diverged (loss {value}); lower lr (now {cfg.lr:g})", "lr")
            weight = 1 if target_mask is None else counted  # masked: the epoch's mean over its counted tokens
            prog.epoch_loss_sum += value * weight
            prog.epoch_weight += weight
            self.recent_loss = value if self.recent_loss is None else 0.9 * self.recent_loss + 0.1 * value
            self.prog.step += 1
            self.prog.tokens += x.numel()
            self.session_tokens += x.numel()
            self.prog.elapsed_s = self.elapsed()
            if time.perf_counter() - self.last_report >= self.interval_s:
                self.emit("progress", train_loss=self.recent_loss)
            self.maybe_validate()
        return self._end_epoch(), self.limit_reached()

    def shift_streams(self, epoch: int) -> None:
        """Each epoch after the first starts the B streams at a new place in the corpus (lm/data.py
        `epoch_offset`): every window then begins at a different character and carries a different state into
        it, so later epochs do not replay the first one's windows."""
        if self.train_ids is None:
            return
        offset = epoch_offset(len(self.train_ids), self.cfg.seed, epoch)
        self.data = batchify(rotate(self.train_ids, offset), self.cfg.batch_size)
        if self.train_mask is not None:
            self.targets = batchify(rotate(self.train_mask, offset), self.cfg.batch_size)

    def _end_epoch(self) -> float | None:
        """The epoch's mean train loss (None if no step ran), and the counters reset for the next epoch."""
        prog = self.prog
        mean = prog.epoch_loss_sum / prog.epoch_weight if prog.epoch_weight else None
        prog.window, prog.epoch_loss_sum, prog.epoch_weight = 0, 0.0, 0.0
        return mean

    def update_average(self) -> None:
        """One step of the weights' EMA. Its decay ramps up as (1 + t) / (10 + t) to cfg.ema, so the first
        steps' (random) weights leave it quickly (TensorFlow's ExponentialMovingAverage num_updates)."""
        if self.ema is None:
            return
        decay = min(self.cfg.ema, (1 + self.prog.step) / (10 + self.prog.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The model holds the EMA's weights inside the block (validation, the best's snapshot); the raw ones
        after it. No-op when cfg.ema is off."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.ema, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw, strict=True):
                    p.copy_(r)

    def averaged_weights(self) -> dict[str, Tensor] | None:
        """The EMA as tensors for the resumable state (in parameter order), or None."""
        return None if self.ema is None else {str(i): a for i, a in enumerate(self.ema)}

    def restore_average(self, saved: dict[str, Tensor] | None) -> None:
        if self.ema is not None and saved is not None and len(saved) == len(self.ema):
            with torch.no_grad():
                for i, a in enumerate(self.ema):
                    a.copy_(saved[str(i)])

    def planned(self) -> tuple[int, int]:
        """(epochs, total steps) for the events: the caps, or in a run only its budget ends, the estimate at
        this pace (at least the epoch being trained)."""
        cap = self.cfg.epoch_cap()
        if cap is not None or self.cfg.time_budget_s is None:
            return cap or 0, self.total_steps
        dt = time.perf_counter() - self.session_start
        pace = (self.prog.step - self.session_start_step) / dt if dt > 0 else 0.0
        left = max(0.0, self.cfg.time_budget_s - self.elapsed())
        steps = self.prog.step + int(pace * left)
        if self.cfg.max_steps is not None:
            steps = min(steps, self.cfg.max_steps)
        epochs = max(self.prog.epoch + 1, math.ceil(steps / max(1, self.steps_per_epoch)))
        return epochs, max(steps, self.prog.step)

    def tokens_per_s(self) -> float:
        dt = time.perf_counter() - self.session_start
        return self.session_tokens / dt if dt > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.tokens_per_s()
        if rate <= 0:
            return None
        tokens_per_step = self.cfg.batch_size * self.cfg.seq_len
        eta = (self.total_steps - self.prog.step) * tokens_per_step / rate
        if self.cfg.time_budget_s is not None:
            eta = min(eta, max(0.0, self.cfg.time_budget_s - self.elapsed()))
        return eta

    def emit(self, kind: str, *, train_loss: float | None, val_loss: float | None = None, sample: str | None = None):
        self.last_report = time.perf_counter()
        if self.on_event is None:
            return
        epoch = self.prog.epoch + 1 if kind in ("progress", "validation") else self.prog.epoch
        epochs, total_steps = self.planned()
        self.on_event(
            TrainEvent(
                kind=kind,
                epoch=epoch,
                epochs=epochs,
                step=self.prog.step,
                total_steps=total_steps,
                train_loss=train_loss,
                val_loss=val_loss,
                tokens_per_s=self.tokens_per_s(),
                eta_s=self.eta_s(),
                elapsed_s=self.elapsed(),
                lr=self.lr,
                sample=sample,
                session_elapsed_s=time.perf_counter() - self.session_start,
            )
        )


def _adopt_architecture(cfg: TrainConfig, base: Checkpoint) -> TrainConfig:
    """Fine-tuning keeps the base model's architecture and tokenizer."""
    arch = base.model.cfg
    return replace(
        cfg,
        tokenizer=base.tokenizer.kind,
        vocab_size=arch.vocab_size,
        embedding_dim=arch.embedding_dim,
        hidden_dim=arch.hidden_dim,
        layers=arch.layers,
        dropout=arch.dropout,
        tie_weights=arch.tie_weights,
    )


def _split(
    tokenizer: Tokenizer,
    pieces: list[tuple[str, bool]],
    val_text: str | None,
    fmt: DataFormat,
    chat_template: dict[str, Any] | None,
    cfg: TrainConfig,
) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
    """((train ids, mask), (validation ids, mask)): the validation text's own, or the corpus's last
    `val_fraction` of tokens (nanoGPT's split, by position)."""
    ids, mask = encode_segments(tokenizer, pieces)
    if val_text is not None:
        return (ids, mask), encode_segments(tokenizer, segments(val_text, fmt, chat_template))
    train_ids, val_ids = split_corpus(ids, cfg.val_fraction)
    if mask is None:
        return (train_ids, None), (val_ids, None)
    return (train_ids, mask[: len(train_ids)]), (val_ids, mask[len(train_ids) :])


def _check_trainable(train_mask: Tensor | None, val_mask: Tensor | None) -> None:
    """Chat and prompt/completion data: each part needs tokens the loss counts (its first token is no target)."""
    if train_mask is not None and not bool(train_mask[1:].any()):
        raise CorpusError("the training part has no tokens to learn (no assistant message, no completion)")
    if val_mask is not None and not bool(val_mask[1:].any()):
        raise CorpusError(
            "the validation part has no tokens to score (no assistant message, no completion); "
            "raise val_fraction or give a validation text"
        )


def _check_corpus_size(n_train: int, n_val: int, cfg: TrainConfig) -> None:
    need = 2 * cfg.batch_size
    if n_train < need:
        raise CorpusError(
            f"corpus is shorter than one batch: {n_train} training tokens, but batch_size {cfg.batch_size} "
            f"needs at least {need}; give more text or lower batch_size"
        )
    if n_val < 2:
        raise CorpusError("corpus is too short to hold out a validation part; give more text or raise val_fraction")


def _metrics(
    train_loss: float | None, val_loss: float, chars_per_token: float, prog: Progress, stopped_by: str, kernel: str
) -> dict[str, Any]:
    bits_per_token = val_loss / math.log(2)
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 700.0)),
        "val_bits_per_token": bits_per_token,
        "val_bits_per_char": bits_per_token / max(chars_per_token, 1e-9),
        "steps": prog.step,
        "epochs": prog.epoch,
        "tokens": prog.tokens,
        "elapsed_s": prog.elapsed_s,
        "tokens_per_s": prog.tokens / prog.elapsed_s if prog.elapsed_s > 0 else 0.0,
        "stopped_by": stopped_by,
        "lstm_kernel": kernel,
    }


def _recipe_metrics(
    cfg: TrainConfig, prog: Progress, kept_best: bool, recipe_choice: dict[str, Any] | None
) -> dict[str, Any]:
    """What the recipe did besides the losses: the weights kept, the epoch cap, the sizes it fitted, the
    regularisers it ran with."""
    regularisers = {name: getattr(cfg, name) for name in REGULARISERS if getattr(cfg, name)}
    return {
        "kept": "best" if kept_best else "last",  # the best epoch by validation loss, or the last weights
        "best_epoch": prog.best_epoch,
        "epoch_cap": cfg.epoch_cap(),  # None: only the time budget (or max_steps, early stopping) ended it
        "recipe_choice": recipe_choice,  # the sizes fitted to the corpus and budget, and why; None: all given
        "regularisation": regularisers,
    }


REGULARISERS = ("weight_drop", "locked_dropout", "embedding_dropout", "ar", "tar", "ema")
