"""The decode steps of `LSTMLanguageModel`: one token of every running sequence per call, chosen by name.

A decode step takes the last token of every running sequence and their LSTM states, and returns the
next-token logits while updating the states in place:

    step(tokens (B,), h (layers, B, H), c (layers, B, H)) -> logits (B, V)

Three kinds, measured against each other in docs/PERFORMANCE.md:

- `reference`: the model's own forward (Embedding -> nn.LSTM -> Linear) on a (B, 1) batch. On CPU
  each nn.LSTM call re-formats its weights for oneDNN, so one step costs about a millisecond at B=1.
- `fused`: the same fp32 arithmetic in a handful of tensor ops per layer. Layer 0's input projection
  is folded into a (V, 4H) table (the embedding is a lookup, so `W_ih @ emb[t] + b` can be looked up
  too); each layer is one matmul for the recurrence and ONE sigmoid over all four gates (gates are
  reordered i, f, o, g, and g's rows are doubled at build so that tanh(x) = 2 * sigmoid(2x) - 1:
  torch's tanh kernel costs about six times its sigmoid per element on these CPUs).
- `int8`: `fused` with the recurrent matmuls in int8 x int8 -> int32: weights quantized per output
  row (symmetric), the hidden state quantized with the fixed scale 1/127 (|h| <= 1 always:
  h = o * tanh(c)). A single row goes through `torch._int_mm` (oneDNN's GEMV path); two rows or more
  through oneDNN's int8 GEMM with weights packed once at build (`onednn::qlinear_pointwise`, the h
  codes shifted by 128 into uint8), which `_int_mm` would re-pack on every call (a fixed ~0.3 ms).
  Both give the same exact integer sums, so a row's state does not depend on the other rows of the
  batch (the fp32 head, like the reference's matmuls, agrees across batch sizes to rounding only).
  The embedding table and the output head stay fp32.

Each kind also runs whole prompts (`step.prefill`): `reference` through nn.LSTM in one call per
power-of-two piece, `fused` layer by layer, `int8` along a wavefront (all layers in one product per
position), bit for bit the state its decode steps would reach; and several prompts together
(`step.steps`: n batched steps, the head on the last only).

`int8` runs its loops in C++ (`NativeInt8Step`) where this install has built
lm/kernels/csrc/int8_step.cpp: the same arithmetic to the bit, but one call per step or prompt
instead of dozens of Python-level dispatches, and with the GIL released for the whole call.

    step.py         the `Step` interface
    reference.py    `reference`
    fused.py        `fused`, and `int8` with its loops in Python
    quantize.py     int8 weight and state codes, the exact integer products
    native_int8.py  `int8` with its loops in C++
"""

from __future__ import annotations

import logging

import torch

from lm.decode.fused import FusedStep
from lm.decode.native_int8 import NativeInt8Step
from lm.decode.reference import ReferenceStep
from lm.decode.step import Step
from lm.errors import ConfigError
from lm.kernels import native
from lm.model import LSTMLanguageModel

log = logging.getLogger(__name__)

DECODE_KINDS = ("int8", "fused", "reference")

__all__ = ["DECODE_KINDS", "FusedStep", "NativeInt8Step", "ReferenceStep", "Step", "build_step", "int8_available"]


def build_step(model: LSTMLanguageModel, kind: str, *, native_loops: bool = True) -> Step:
    """The decode step of `kind` for `model` (weights are copied: later changes to the model are not seen).

    `native_loops`: int8 runs its loops in C++ (`NativeInt8Step`) when lm/kernels/native.py's module is built
    (False: Python)."""
    if kind not in DECODE_KINDS:
        raise ConfigError(f"decode kind must be one of {', '.join(DECODE_KINDS)}, got {kind!r}", "decode")
    if kind == "reference":
        return ReferenceStep(model)
    if kind == "int8" and not int8_available():
        log.warning("int8 matmul is not available in this torch build; decoding with the fp32 fused step")
        kind = "fused"
    if next(model.parameters()).device.type != "cpu":
        log.info("the fused steps are CPU kernels; decoding on %s with the reference step", model.head.weight.device)
        return ReferenceStep(model)
    if kind == "int8" and native_loops:
        module = native.load()
        if module is not None:
            return NativeInt8Step(model, module)
        log.info("the native int8 step is not built (python -m lm.kernels.native build); running its loops in Python")
    return FusedStep(model, int8=kind == "int8")


def int8_available() -> bool:
    try:
        a, w = torch.ones(1, 32, dtype=torch.int8), torch.ones(8, 32, dtype=torch.int8)
        return int(torch._int_mm(a, w.t())[0, 0]) == 32
    except (AttributeError, RuntimeError):
        return False
