"""The training loop's LSTM: the same model, trained through textgen's own LSTM kernel on CPU.

`LSTMLanguageModel.forward` runs `nn.LSTM`, which on CPU is oneDNN's LSTM kernel. `forward` here
computes the same function from the same parameters, split the way a training step is best done
on a CPU (docs/TRAINING.md, "The training kernel"):

- each layer's input projection, x W_ih^T, is one product over the whole window, and so are its
  weight and input gradients, through autograd's own `linear`;
- the recurrence runs in C++ (lm/kernels/csrc/lstm_train.cpp): one oneDNN product per step on W_hh packed
  once per window, with the step's input projection added in the same call, then one fused pass
  over the gates (the bias b_ih + b_hh, in fp32, the vectorized activations, the cell, the
  output); the backward mirrors it, and W_hh's gradient is one product over the window;
- dropout (on the embeddings, between layers, before the head, at the model's rates) draws its
  mask from a hash of a seed and the element's index, so the backward recomputes it;
- AWD-LSTM's regularisers (`Regularisation`; Merity et al. 2017), when the recipe sets them, transform
  what goes into the same kernel: DropConnect masks W_hh once per step before it is packed, locked
  (variational) dropout shares one mask per stream over the window's steps, embedding dropout drops
  rows of the embedding, and AR/TAR add a penalty on the last layer's output to the loss.

Under bf16 autocast the products run in bf16; the cell state and every gradient sum stay in fp32.
The parameters, and so the checkpoints, are the model's own: nothing here changes what is saved or
served. Without the native build (or with `native=False`: `TEXTGEN_NATIVE=false`) training runs `nn.LSTM`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.kernels import native
from lm.model import LSTMLanguageModel, State

log = logging.getLogger(__name__)

Forward = Callable[[Tensor, State | None], tuple[Tensor, State, Tensor | None]]  # logits, state, AR/TAR penalty


@dataclass(frozen=True)
class Regularisation:
    """AWD-LSTM's regularisers (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models") that a
    training step applies on top of the model's dropout; each is off at 0 (False), and none applies in eval."""

    weight_drop: float = 0.0  # DropConnect (Wan et al. 2013) on each layer's W_hh, one mask per step
    locked: bool = False  # the model's dropout with one mask per stream for every step of the window
    embedding_drop: float = 0.0  # drop whole rows of the embedding (Gal & Ghahramani 2016), per step
    ar: float = 0.0  # ar * mean(y^2), y the last layer's dropped output
    tar: float = 0.0  # tar * mean((h_t - h_(t-1))^2), h the last layer's output before dropout


NONE = Regularisation()
PENALTY_SPAN = 16  # the steps of a window AR/TAR are estimated on (`_penalty`)


def _pack(weight: Tensor, batch: int) -> Tensor:
    """`weight` (out, in) in the layout oneDNN's linear reads fastest for `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch)


class _Recurrence(torch.autograd.Function):
    """One layer over a window: (x W_ih^T (T, B, 4H), W_hh, b_ih + b_hh, h0, c0) -> (y (T, B, H), h_T, c_T)."""

    @staticmethod
    def forward(
        ctx: Any, xproj: Tensor, w_hh: Tensor, bias: Tensor, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = xproj.dtype
        weight = w_hh.detach().to(dtype)
        h0 = h0.detach().to(dtype).contiguous()
        c0 = c0.detach().to(torch.float32).contiguous()
        y, acts, c, tc = _module().lstm_forward(
            xproj.contiguous(), _pack(weight, xproj.size(1)), bias.detach().float().contiguous(), h0, c0
        )
        ctx.save_for_backward(y)
        ctx.saved = (weight, h0, c0, acts, c, tc)
        ctx.dtypes = (w_hh.dtype, bias.dtype)
        return y, y[-1].to(torch.float32, copy=True), c[-1].clone()

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor, dh_last: Tensor, dc_last: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        (y,) = ctx.saved_tensors
        weight, h0, c0, acts, c, tc = ctx.saved
        ctx.saved = None
        steps, batch, hidden = y.shape
        state_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dgates, dbias, dh0, dc0 = _module().lstm_backward(
            dy.to(y.dtype).contiguous(), dh_last, dc_last, _pack(weight.t(), batch), acts, c, tc, c0, state_grads
        )
        h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).view(steps * batch, hidden)
        dw_hh = dgates.view(steps * batch, 4 * hidden).t() @ h_prev  # one product over the window
        w_dtype, b_dtype = ctx.dtypes
        if not state_grads:
            dh0 = dc0 = None
        return dgates, dw_hh.to(w_dtype), dbias.to(b_dtype), dh0, dc0


class _Dropout(torch.autograd.Function):
    """Dropout whose mask is a hash of (seed, index): the backward recomputes it instead of storing it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return _module().dropout(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _module().dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


def _dropout(x: Tensor, p: float, training: bool, locked: bool = False, native: bool = True) -> Tensor:
    """Dropout at rate `p`; `locked`: x is (T, B, D) and every step shares one (B, D) mask (variational dropout,
    Gal & Ghahramani 2016), a mask small enough that autograd keeps it. `native`: the hashed mask, else torch's."""
    if not training or p == 0.0:
        return x
    if locked:
        mask = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)  # (B, D)
        return x * mask
    if not native or x.numel() >= 2**32:  # past the kernel's 32-bit element counter
        return F.dropout(x, p, training)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's generator: seeded runs repeat
    return _Dropout.apply(x, p, seed)


def forward(model: LSTMLanguageModel, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """`model(ids, state)` with the recurrence in textgen's kernel: logits (B, T, V) and the final state."""
    logits, state, _ = regularised_forward(model, ids, state)
    return logits, state


def regularised_forward(
    model: LSTMLanguageModel, ids: Tensor, state: State | None = None, reg: Regularisation = NONE
) -> tuple[Tensor, State, Tensor | None]:
    """`forward` with `reg` applied in train mode: logits (B, T, V), the final state, and AR/TAR's penalty (None
    when they are off) for the loss."""
    lstm = model.lstm
    p, training = model.drop.p, model.training
    embedding = _drop_rows(model.embedding.weight, reg.embedding_drop, training)  # (V, E)
    x = _dropout(F.embedding(ids.t(), embedding), p, training, reg.locked)  # (T, B, E): time-major, a step a block
    batch = ids.size(0)
    if state is None:
        state = model.init_state(batch, dtype=torch.float32)
    h0, c0 = state
    h_last, c_last = [], []
    y = x
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        w_hh = _dropout(w_hh, reg.weight_drop, training)  # DropConnect: this step's mask, before W_hh is packed
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")  # added in the cell, in fp32
        xproj = F.linear(x, w_ih)  # (T, B, 4H), every step in one product
        y, h, c = _Recurrence.apply(xproj, w_hh, bias, h0[layer], c0[layer])
        h_last.append(h)
        c_last.append(c)
        x = _dropout(y, lstm.dropout if layer < lstm.num_layers - 1 else p, training, reg.locked)
    logits = model.head(x.transpose(0, 1))  # (B, T, V)
    return logits, (torch.stack(h_last), torch.stack(c_last)), _penalty(reg, x, y, training)


def _drop_rows(weight: Tensor, p: float, training: bool) -> Tensor:
    """Embedding dropout (AWD-LSTM's `embedded_dropout`): whole rows, so a dropped word is gone from every step."""
    if not training or p == 0.0:
        return weight
    mask = torch.empty(weight.size(0), 1, dtype=weight.dtype, device=weight.device).bernoulli_(1 - p).div_(1 - p)
    return weight * mask


def _penalty(reg: Regularisation, dropped: Tensor, raw: Tensor, training: bool) -> Tensor | None:
    """AR and TAR (Merity et al. 2017, section 4.6) on the last layer's output, (T, B, H) time-major.

    Both are means over the window's steps, estimated on a random run of PENALTY_SPAN of its steps: the
    same expected gradient at a fraction of the cost (the recipe's bf16 window on 2 loaded cores: 68 ms
    forward and backward over all 128 steps, 20 ms over 16, beside a step of about 265 ms); over 16 steps
    times the batch the estimate's own noise is small."""
    if not training or (reg.ar == 0.0 and reg.tar == 0.0):
        return None
    steps = raw.size(0)
    span = min(steps, PENALTY_SPAN)
    start = int(torch.randint(0, steps - span + 1, (1,)).item())  # torch's generator: seeded runs repeat
    dropped, raw = dropped[start : start + span], raw[start : start + span]
    penalty = reg.ar * _mean_square(dropped)
    if reg.tar and span > 1:
        penalty = penalty + reg.tar * _mean_square(raw[1:] - raw[:-1])
    return penalty


def _mean_square(x: Tensor) -> Tensor:
    """mean(x^2), in fp32."""
    x = x.float()
    return torch.linalg.vector_norm(x).square() / x.numel()


def torch_forward(
    model: LSTMLanguageModel, ids: Tensor, state: State | None = None, reg: Regularisation = NONE
) -> tuple[Tensor, State, Tensor | None]:
    """The same step through nn.LSTM (no native build, a GPU): DropConnect through `functional_call`, the
    dropouts around the LSTM locked when asked; between its layers nn.LSTM's own (per-element) dropout."""
    p, training = model.drop.p, model.training
    embedding = _drop_rows(model.embedding.weight, reg.embedding_drop, training)
    x = _dropout(F.embedding(ids.t(), embedding), p, training, reg.locked, native=False).transpose(0, 1)  # (B, T, E)
    weights = {}
    if training and reg.weight_drop:
        for layer in range(model.lstm.num_layers):
            name = f"weight_hh_l{layer}"
            weights[name] = F.dropout(getattr(model.lstm, name), reg.weight_drop)
    out, state = torch.func.functional_call(model.lstm, weights, (x, state)) if weights else model.lstm(x, state)
    raw = out.transpose(0, 1)  # (T, B, H)
    dropped = _dropout(raw, p, training, reg.locked, native=False)
    return model.head(dropped.transpose(0, 1)), state, _penalty(reg, dropped, raw, training)


def _module() -> ModuleType:
    module = native.load()  # cached; its name hashes both sources, so a loaded build has the kernel
    if module is None:
        raise RuntimeError("textgen's native module is not built (python -m lm.kernels.native build)")
    return module


@functools.cache
def _packing_works() -> bool:
    """oneDNN's packed linear is there and gives the plain product (checked once, on a tiny case)."""
    try:
        weight, x = torch.randn(8, 4), torch.randn(2, 4)
        out = torch.ops.mkldnn._linear_pointwise.binary(x, torch.zeros(2, 8), _pack(weight, 2), None, "add")
        return bool(torch.allclose(out, x @ weight.t(), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def usable(model: nn.Module, device: torch.device) -> bool:
    """Whether `forward` can train this model here: a CPU, the native build, oneDNN, a plain nn.LSTM."""
    if not (device.type == "cpu" and isinstance(model, LSTMLanguageModel)):
        return False
    lstm = model.lstm
    if lstm.bidirectional or lstm.proj_size or not lstm.bias or not lstm.batch_first:
        return False
    return native.load() is not None and torch.backends.mkldnn.is_available() and _packing_works()


def training_forward(
    model: LSTMLanguageModel, device: torch.device, *, native: bool = True, reg: Regularisation = NONE
) -> tuple[Forward, str]:
    """The forward a training step runs (logits, state, AR/TAR penalty or None), and its name for logs and
    benchmarks. `native` (the `TEXTGEN_NATIVE` setting, default true) allows textgen's kernel; False trains
    nn.LSTM. `reg`: AWD-LSTM's regularisers, applied in train mode only."""
    if native and usable(model, device):
        return functools.partial(regularised_forward, model, reg=reg), "textgen"
    if reg == NONE:
        return lambda ids, state: (*model(ids, state), None), "nn.LSTM"
    return functools.partial(torch_forward, model, reg=reg), "nn.LSTM"
