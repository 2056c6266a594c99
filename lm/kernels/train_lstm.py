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
  mask from a hash of a seed and the element's index, so the backward recomputes it.

Under bf16 autocast the products run in bf16; the cell state and every gradient sum stay in fp32.
The parameters, and so the checkpoints, are the model's own: nothing here changes what is saved or
served. Without the native build (or with `native=False`: `TEXTGEN_NATIVE=false`) training runs `nn.LSTM`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.kernels import native
from lm.model import LSTMLanguageModel, State

log = logging.getLogger(__name__)

Forward = Callable[[Tensor, State | None], tuple[Tensor, State]]


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


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    if x.numel() >= 2**32:  # past the kernel's 32-bit element counter
        return F.dropout(x, p, training)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's generator: seeded runs repeat
    return _Dropout.apply(x, p, seed)


def forward(model: LSTMLanguageModel, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """`model(ids, state)` with the recurrence in textgen's kernel: logits (B, T, V) and the final state."""
    lstm = model.lstm
    p, training = model.drop.p, model.training
    x = _dropout(model.embedding(ids.t()), p, training)  # (T, B, E): time-major, a step is one block
    batch = ids.size(0)
    if state is None:
        state = model.init_state(batch, dtype=torch.float32)
    h0, c0 = state
    h_last, c_last = [], []
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")  # added in the cell, in fp32
        xproj = F.linear(x, w_ih)  # (T, B, 4H), every step in one product
        y, h, c = _Recurrence.apply(xproj, w_hh, bias, h0[layer], c0[layer])
        h_last.append(h)
        c_last.append(c)
        x = _dropout(y, lstm.dropout if layer < lstm.num_layers - 1 else p, training)
    logits = model.head(x.transpose(0, 1))  # (B, T, V)
    return logits, (torch.stack(h_last), torch.stack(c_last))


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


def training_forward(model: LSTMLanguageModel, device: torch.device, *, native: bool = True) -> tuple[Forward, str]:
    """The forward a training step runs, and its name for logs and benchmarks.

    `native` (the `TEXTGEN_NATIVE` setting, default true) allows textgen's kernel; False trains nn.LSTM."""
    if native and usable(model, device):
        return functools.partial(forward, model), "textgen"
    return model, "nn.LSTM"
