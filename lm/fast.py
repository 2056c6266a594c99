"""Fast single-token decode steps for `LSTMLanguageModel`, chosen by name.

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

`int8` runs its loops in C++ (`NativeInt8Step`) where this install has built lm/csrc/int8_step.cpp: the
same arithmetic to the bit, but one call per step or prompt instead of dozens of Python-level
dispatches, and with the GIL released for the whole call.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor, nn

from lm import native
from lm.errors import ConfigError
from lm.model import LSTMLanguageModel

log = logging.getLogger(__name__)

DECODE_KINDS = ("int8", "fused", "reference")
H_SCALE = 127.0  # int8 code of h = round(h * 127); |h| <= 1


class Step(Protocol):
    kind: str
    loops: str  # "C++" or "Python": where the step's loops run (lm/native.py)

    def __call__(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor: ...

    def advance(self, tokens: Tensor, h: Tensor, c: Tensor) -> None: ...

    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor: ...

    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor: ...


def build_step(model: LSTMLanguageModel, kind: str, *, native_loops: bool = True) -> Step:
    """The decode step of `kind` for `model` (weights are copied: later changes to the model are not seen).

    `native_loops`: int8 runs its loops in C++ (`NativeInt8Step`) when lm/native.py's module is built
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
        log.info("the native int8 step is not built (python -m lm.native build); running its loops in Python")
    return FusedStep(model, int8=kind == "int8")


def int8_available() -> bool:
    try:
        a, w = torch.ones(1, 32, dtype=torch.int8), torch.ones(8, 32, dtype=torch.int8)
        return int(torch._int_mm(a, w.t())[0, 0]) == 32
    except (AttributeError, RuntimeError):
        return False


class ReferenceStep:
    """The model's own forward, one token per sequence; prompts through nn.LSTM in one call per chunk."""

    kind = "reference"
    loops = "Python"

    def __init__(self, model: LSTMLanguageModel) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        logits, (h_new, c_new) = self.model(tokens[:, None], (h.contiguous(), c.contiguous()))  # (B, 1, V)
        h.copy_(h_new)
        c.copy_(c_new)
        return logits[:, 0]

    def advance(self, tokens: Tensor, h: Tensor, c: Tensor) -> None:
        """The step without needing its logits (the model's forward computes them anyway)."""
        self(tokens, h, c)

    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """ids (k, n): n steps of k sequences -> logits (k, V) of the last."""
        return _steps(self, ids, h, c)

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """tokens (T,); h, c (layers, 1, H) updated in place -> logits (V,) of the last position.

        One nn.LSTM call per power-of-two piece of the prompt (200 = 128 + 64 + 8): oneDNN caches a
        compiled primitive per sequence length, about 0.75 MB each for the default model, so
        arbitrary lengths would grow the process by hundreds of MB; a handful of lengths do not.
        """
        state = (h, c)
        start, logits = 0, None
        while start < len(tokens):
            n = 1 << ((len(tokens) - start).bit_length() - 1)  # the largest power of two that fits
            out, state = self.model(tokens[None, start : start + n], state)  # (1, n, V)
            logits = out[0, -1]
            start += n
        h.copy_(state[0])
        c.copy_(state[1])
        assert logits is not None, "an empty prompt"
        return logits


def _steps(step: Step, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
    """ids (k, n) -> n steps of k sequences, the head on the last only -> logits (k, V)."""
    for t in range(ids.shape[1] - 1):
        step.advance(ids[:, t], h, c)
    return step(ids[:, -1], h, c)


def _reorder_gates(w: Tensor, hidden: int) -> Tensor:
    """nn.LSTM's gate blocks (i, f, g, o) along dim 0 -> (i, f, o, 2g): the cell applies one sigmoid to
    all four, and 2 * sigmoid(2x) - 1 = tanh(x). Doubling is exact in floating point, and in int8 it
    doubles the row's scale and leaves its codes as they were."""
    i, f, g, o = w.split(hidden, dim=0)
    return torch.cat([i, f, o, g * 2], dim=0)


def _quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) fp32 -> int8 codes (out, in) and one scale per output row (out,), symmetric."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _quantize_h(x: Tensor) -> Tensor:
    """x (B, H) with |x| <= 1 -> int8 codes at the fixed scale 1/127 (so a row's codes depend on that row only)."""
    return torch.round(x * H_SCALE).to(torch.int8)


class Int8Matrix:
    """Int8 weight codes w (in, out) and the product x (N, in) -> the exact integer sums of
    round(127 x) @ w, as fp32 (N, out).

    One row: `torch._int_mm` on a transposed view of row-major codes (oneDNN's GEMV). Several rows:
    oneDNN's int8 GEMM on weights packed once (`onednn::qlinear_pointwise`, unit scales, the h codes
    shifted by 128 into uint8 with zero point 128), where `_int_mm` would re-pack the weights on
    every call. Both paths give the same sums bit for bit (checked here at build; without the packed
    kernel, or if it disagrees, every product takes `_int_mm`).
    """

    def __init__(self, codes: Tensor) -> None:
        """codes (out, in) int8, row-major."""
        self.t = codes.contiguous().t()  # (in, out): the fast layout for _int_mm
        self.packed: Tensor | None = None
        out = codes.shape[0]
        # the packed GEMM's per-row weight scales and zero points: unit and zero (the sums stay integers)
        self.w_scales, self.w_zero_points = torch.ones(out), torch.zeros(out, dtype=torch.long)
        try:
            self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
            probe = torch.linspace(-1, 1, 3 * codes.shape[1]).view(3, -1)  # includes |h| = 1
            if not torch.equal(self._packed_mm(probe), torch._int_mm(_quantize_h(probe), self.t).float()):
                log.warning("oneDNN's packed int8 GEMM disagrees with _int_mm here; using _int_mm only")
                self.packed = None
        except (AttributeError, RuntimeError):
            self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None or x.shape[0] == 1:
            return torch._int_mm(_quantize_h(x), self.t).float()
        return self._packed_mm(x)

    def _packed_mm(self, x: Tensor) -> Tensor:
        codes = torch.round(x * H_SCALE).add_(128).to(torch.uint8)  # round first: exactly the int8 codes + 128
        return torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 128, self.packed, self.w_scales, self.w_zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )


class FusedStep:
    """Hand-fused LSTM cells (fp32 or int8 matmuls) + fp32 output head.

    Per layer: gates = base + x_below @ W_ih^T + h @ W_hh^T, where base is layer 0's table row
    (input projection and biases) or the layer's bias. In int8 both products accumulate exactly in
    int32 (one scale per gate row, shared by W_ih and W_hh) and are scaled once, so running a prompt
    (all layers at once along a wavefront) gives bit for bit the state that decoding the same tokens
    one step at a time gives.
    """

    loops = "Python"

    def __init__(self, model: LSTMLanguageModel, *, int8: bool) -> None:
        cfg = model.cfg
        self.kind = "int8" if int8 else "fused"
        self.int8 = int8
        self.hidden = H = cfg.hidden_dim
        self.layers = cfg.layers
        lstm: nn.LSTM = model.lstm
        with torch.no_grad():
            p = lstm.get_parameter
            w_ih0 = _reorder_gates(p("weight_ih_l0").detach().float(), H)  # (4H, E)
            b0 = _reorder_gates((p("bias_ih_l0") + p("bias_hh_l0")).detach().float(), H)  # (4H,)
            # layer 0's input gates for every vocabulary entry: (V, 4H)
            self.table = (model.embedding.weight.detach().float() @ w_ih0.t() + b0).contiguous()
            # fp32: per layer, (in, 4H) matrices; int8: Int8Matrix products of the same shapes
            self.w_hh: list[Tensor] = []  # fp32 only: the recurrent weights alone (prefill)
            self.w_ih: list[Tensor | None] = [None]  # fp32 only; layer 0's input product is in the table
            self.w_both: list[Tensor | Int8Matrix] = []  # [W_ih, W_hh] side by side (layer 0: W_hh)
            self.scale: list[Tensor] = []  # int8 only: (1, 4H) = gate-row scale / 127 (the h code scale)
            self.bias: list[Tensor] = [b0]  # layer 0: unused (in the table)
            for layer in range(cfg.layers):
                w_hh = _reorder_gates(p(f"weight_hh_l{layer}").detach().float(), H)  # (4H, H)
                w_ih = None
                if layer > 0:
                    w_ih = _reorder_gates(p(f"weight_ih_l{layer}").detach().float(), H)  # (4H, H)
                    b = p(f"bias_ih_l{layer}") + p(f"bias_hh_l{layer}")
                    self.bias.append(_reorder_gates(b.detach().float(), H)[None, :].contiguous())
                both = w_hh if w_ih is None else torch.cat([w_ih, w_hh], dim=1)  # (4H, in + H)
                if int8:
                    _, scale = _quantize_rows(both)  # one scale per gate row for both products
                    self.scale.append((scale / H_SCALE)[None, :].contiguous())
                    self.w_both.append(Int8Matrix(_codes(both, scale)))
                else:
                    self.w_hh.append(w_hh.t().contiguous())
                    self.w_both.append(both.t().contiguous())
                    if w_ih is not None:
                        self.w_ih.append(w_ih.t().contiguous())
            self.head_w = model.head.weight.detach().float().t().contiguous()  # (H, V)
            self.head_b = model.head.bias.detach().float().contiguous()  # (V,)

    @functools.cached_property
    def _wavefront(self) -> tuple[Tensor, Tensor, Tensor]:
        """int8 prefill runs layer l at position t - l, so that one product serves every layer:
        [h_0, ..., h_{L-1}] (1, L*H) @ W (L*H, L*4H), where W's block (j, l) is layer l's W_hh
        (j = l) or W_ih (j = l - 1) and zero elsewhere. The zero blocks add exact integer zeros, so
        each layer's int32 sums are the ones decode computes. Built on the first prompt: the native
        loops multiply each layer's own slice instead and never need it.
        -> W as a transposed view (the fast layout for one row), scales (L, 4H), biases (L, 4H)."""
        L, H = self.layers, self.hidden
        wave = torch.zeros(L * 4 * H, L * H, dtype=torch.int8)  # (out, in), row-major
        for layer, matrix in enumerate(self.w_both):
            rows = slice(layer * 4 * H, (layer + 1) * 4 * H)
            cols = slice(max(0, layer - 1) * H, (layer + 1) * H)
            wave[rows, cols] = matrix.t.t()  # type: ignore[union-attr]  # (4H, in + H): [W_ih | W_hh] codes
        scales = torch.cat(self.scale, dim=0)
        biases = torch.cat([torch.zeros(1, 4 * H), *self.bias[1:]], dim=0)  # row 0: in the table
        return wave.t(), scales, biases

    # -- the arithmetic, shared by decode and prefill ----------------------------------------------

    def _product(self, x: Tensor, w: Tensor | Int8Matrix) -> Tensor:
        """x (N, in) @ w (in, 4H) -> fp32 (N, 4H); in int8 the exact integer sums."""
        if isinstance(w, Int8Matrix):
            return w(x)
        return x @ w

    def _gates(self, layer: int, base: Tensor, acc: Tensor) -> Tensor:
        """base (N, 4H) fp32 + the accumulated products acc (N, 4H)."""
        if self.int8:
            return torch.addcmul(base, acc, self.scale[layer])
        return base + acc

    def _cell(self, gates: Tensor, h: Tensor, c: Tensor) -> None:
        """gates (B, 4H), a fresh tensor ordered i, f, o, 2g; h, c (B, H) views of the state, updated in place.

        tanh(x) = 2 * sigmoid(2x) - 1 both for g (its rows were doubled at build) and for tanh(c).
        """
        H = self.hidden
        s = gates.sigmoid_()
        i, f, o = s[:, : 3 * H].chunk(3, dim=1)  # (B, H) each
        g = s[:, 3 * H :].mul_(2).sub_(1)  # tanh of g's pre-activation
        c.mul_(f).addcmul_(i, g)  # c = f * c + i * g
        t = torch.mul(c, 2).sigmoid_().mul_(2).sub_(1)  # tanh(c)
        torch.mul(o, t, out=h)  # h = o * tanh(c)

    # -- decode and prefill ------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """tokens (B,) int64; h, c (layers, B, H) updated in place -> logits (B, V)."""
        self.advance(tokens, h, c)
        return torch.addmm(self.head_b, h[-1], self.head_w)  # (B, V)

    @torch.inference_mode()
    def advance(self, tokens: Tensor, h: Tensor, c: Tensor) -> None:
        """The state update alone (prompt positions whose logits nobody reads)."""
        for layer in range(self.layers):
            if layer == 0:
                acc = self._product(h[0], self.w_both[0])  # (B, 4H): the recurrent product, old h
                base = self.table.index_select(0, tokens)  # (B, 4H)
            else:
                # [new h below, old h] @ [W_ih, W_hh]^T in one product: in int8 the same integer sums
                # as the prefill wavefront's (integer addition is exact)
                acc = self._product(torch.cat([h[layer - 1], h[layer]], dim=1), self.w_both[layer])
                base = self.bias[layer]
            self._cell(self._gates(layer, base, acc), h[layer], c[layer])

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """tokens (T,); h, c (layers, 1, H) updated in place -> logits (V,) of the last position."""
        if self.int8:
            return self._prefill_wavefront(tokens, h, c)
        return self._prefill_layers(tokens, h, c)

    @torch.inference_mode()
    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """ids (k, n): n steps of k sequences, the head on the last only -> logits (k, V)."""
        return _steps(self, ids, h, c)

    def _layer_step(self, layer: int, h: Tensor, c: Tensor, base: Tensor) -> None:
        """One position of one layer, exactly as decode computes it; h, c (layers, 1, H)."""
        x = h[0] if layer == 0 else torch.cat([h[layer - 1], h[layer]], dim=1)
        acc = self._product(x, self.w_both[layer])
        self._cell(self._gates(layer, base, acc), h[layer], c[layer])

    def _prefill_wavefront(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """int8: layer l at position t - l, all layers in one product and one cell per step (half the
        op dispatches of layer by layer). The first and last L - 1 steps, where some layers have no
        position, run the active layers one by one, top layer first (each reads the states as they
        were before this step)."""
        T, L = len(tokens), self.layers
        w_wave, scale_wave, bias_wave = self._wavefront
        table = self.table.index_select(0, tokens)  # (T, 4H): layer 0's input gates incl. biases
        base = bias_wave.expand(T, -1, -1).clone()  # (T, L, 4H)
        base[:, 0] = table
        hs, cs = h[:, 0], c[:, 0]  # (L, H) views of the state, updated in place
        for t in range(T + L - 1):
            active = [layer for layer in range(L) if 0 <= t - layer < T]
            if len(active) < L:
                for layer in reversed(active):
                    self._layer_step(layer, h, c, table[t - layer : t - layer + 1] if layer == 0 else self.bias[layer])
                continue
            acc = torch._int_mm(_quantize_h(hs.reshape(1, -1)), w_wave)  # (1, L*4H) int32
            gates = torch.addcmul(base[t], acc.view(L, -1).float(), scale_wave)  # (L, 4H)
            self._cell(gates, hs, cs)
        return torch.addmm(self.head_b, h[-1], self.head_w)[0]  # (V,)

    def _prefill_layers(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """fp32, layer by layer: the input product of all T positions in one matmul (layer 0: one table
        lookup), then the recurrence, which is sequential in any LSTM. Each position's h is written
        straight into the layer's output rows (the next layer's input), and per-position views come
        from one `split`: a position costs only the ops of the cell itself.
        """
        T = len(tokens)
        below = None  # (T, H): the layer below's outputs
        for layer in range(self.layers):
            w = self.w_hh[layer]
            if layer == 0:
                base, inputs = self.table.index_select(0, tokens).split(1), None  # T x (1, 4H)
            else:
                base, inputs = self.bias[layer], (below @ self.w_ih[layer]).split(1)  # type: ignore[operator]
            out = torch.empty(T + 1, self.hidden)  # row 0: the initial h; row t + 1: h after position t
            out[0] = h[layer, 0]
            rows, cl = out.split(1), c[layer]
            for t in range(T):
                acc = rows[t] @ w  # (1, 4H)
                gates = base[t] + acc if inputs is None else base + (acc + inputs[t])
                self._cell(gates, rows[t + 1], cl)
            h[layer].copy_(rows[T])
            below = out[1:]
        return torch.addmm(self.head_b, h[-1], self.head_w)[0]  # (V,)


class NativeInt8Step(FusedStep):
    """The int8 step with its loops in C++ (lm/csrc/int8_step.cpp's Int8Step, on this step's own
    tensors): the same bits as `FusedStep(int8=True)`, one call per step, batch of steps or prompt,
    with the GIL released for the whole call."""

    loops = "C++"

    def __init__(self, model: LSTMLanguageModel, module: ModuleType) -> None:
        super().__init__(model, int8=True)
        w: list[Int8Matrix] = self.w_both  # type: ignore[assignment]  # int8: all Int8Matrix
        self.native = module.Int8Step(
            self.hidden,
            self.table,
            self.bias,
            self.scale,
            [m.t for m in w],
            [m.packed for m in w],
            w[0].w_scales,
            w[0].w_zero_points,
            self.head_w,
            self.head_b,
        )

    def __call__(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self.native.step(tokens, h, c)

    def advance(self, tokens: Tensor, h: Tensor, c: Tensor) -> None:
        self.native.advance(tokens, h, c)

    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self.native.prefill(tokens, h, c)

    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self.native.steps(ids, h, c)


def _codes(w: Tensor, scale: Tensor) -> Tensor:
    """w (4H, in) fp32 -> int8 codes at the given per-row scale (4H,)."""
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
