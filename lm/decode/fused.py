"""The fused decode step: the LSTM's arithmetic in a handful of tensor ops per layer, fp32 or int8.

Layer 0's input projection is folded into a (V, 4H) table (the embedding is a lookup, so
`W_ih @ emb[t] + b` can be looked up too); each layer is one matmul for the recurrence and ONE
sigmoid over all four gates (gates are reordered i, f, o, g, and g's rows are doubled at build so
that tanh(x) = 2 * sigmoid(2x) - 1: torch's tanh kernel costs about six times its sigmoid per
element on these CPUs). With `int8=True` the recurrent products are int8 x int8 -> int32
(lm/decode/quantize.py). These are the Python loops; lm/decode/native_int8.py runs int8's in C++.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lm.decode.quantize import H_SCALE, Int8Matrix, quantize_h, quantize_rows
from lm.decode.step import run_steps
from lm.model import LSTMLanguageModel


def reorder_gates(w: Tensor, hidden: int) -> Tensor:
    """nn.LSTM's gate blocks (i, f, g, o) along dim 0 -> (i, f, o, 2g): the cell applies one sigmoid to
    all four, and 2 * sigmoid(2x) - 1 = tanh(x). Doubling is exact in floating point, and in int8 it
    doubles the row's scale and leaves its codes as they were."""
    i, f, g, o = w.split(hidden, dim=0)
    return torch.cat([i, f, o, g * 2], dim=0)


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
            w_ih0 = reorder_gates(p("weight_ih_l0").detach().float(), H)  # (4H, E)
            b0 = reorder_gates((p("bias_ih_l0") + p("bias_hh_l0")).detach().float(), H)  # (4H,)
            # layer 0's input gates for every vocabulary entry: (V, 4H)
            self.table = (model.embedding.weight.detach().float() @ w_ih0.t() + b0).contiguous()
            # fp32: per layer, (in, 4H) matrices; int8: Int8Matrix products of the same shapes
            self.w_hh: list[Tensor] = []  # fp32 only: the recurrent weights alone (prefill)
            self.w_ih: list[Tensor | None] = [None]  # fp32 only; layer 0's input product is in the table
            self.w_both: list[Tensor | Int8Matrix] = []  # [W_ih, W_hh] side by side (layer 0: W_hh)
            self.scale: list[Tensor] = []  # int8 only: (1, 4H) = gate-row scale / 127 (the h code scale)
            self.bias: list[Tensor] = [b0]  # layer 0: unused (in the table)
            for layer in range(cfg.layers):
                w_hh = reorder_gates(p(f"weight_hh_l{layer}").detach().float(), H)  # (4H, H)
                w_ih = None
                if layer > 0:
                    w_ih = reorder_gates(p(f"weight_ih_l{layer}").detach().float(), H)  # (4H, H)
                    b = p(f"bias_ih_l{layer}") + p(f"bias_hh_l{layer}")
                    self.bias.append(reorder_gates(b.detach().float(), H)[None, :].contiguous())
                both = w_hh if w_ih is None else torch.cat([w_ih, w_hh], dim=1)  # (4H, in + H)
                if int8:
                    codes, scale = quantize_rows(both)  # one scale per gate row for both products
                    self.scale.append((scale / H_SCALE)[None, :].contiguous())
                    self.w_both.append(Int8Matrix(codes))
                else:
                    self.w_hh.append(w_hh.t().contiguous())
                    self.w_both.append(both.t().contiguous())
                    if w_ih is not None:
                        self.w_ih.append(w_ih.t().contiguous())
            self.head_w = model.head.weight.detach().float().t().contiguous()  # (H, V)
            self.head_b = model.head.bias.detach().float().contiguous()  # (V,)

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
            return self._prefill_int8_layers(tokens, h, c)
        return self._prefill_layers(tokens, h, c)

    @torch.inference_mode()
    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """ids (k, n): n steps of k sequences, the head on the last only -> logits (k, V)."""
        return run_steps(self, ids, h, c)

    def _prefill_int8_layers(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        """int8, layer by layer: W_ih x the layer below's codes for all T positions in one product, then the
        recurrence with W_hh alone. The two int32 sums add to exactly the sums of a decode step's one
        product over [h_below, h] (integer addition is exact), and each cell runs on a (1, 4H) row as a
        decode step's does: the state after the prompt is, bit for bit, the state after decoding it
        token by token, whatever the hidden size. Each product's weights are a layer's W_ih or W_hh
        alone, which stay in a core's cache across positions (the C++ loops' reason for this order)."""
        T, H = len(tokens), self.hidden
        below = None  # (T, H): the layer below's outputs
        for layer in range(self.layers):
            matrix = self.w_both[layer]
            assert isinstance(matrix, Int8Matrix)
            codes = matrix.t  # (in, 4H) int8 view
            w_hh = codes if layer == 0 else codes[H:]
            inputs = None
            if layer == 0:
                base = self.table.index_select(0, tokens).split(1)  # T x (1, 4H)
            else:
                inputs = torch._int_mm(quantize_h(below), codes[:H]).split(1)  # type: ignore[arg-type]  # T x (1, 4H)
            out = torch.empty(T + 1, H)  # row 0: the initial h; row t + 1: h after position t
            out[0] = h[layer, 0]
            rows, cl = out.split(1), c[layer]
            for t in range(T):
                acc = torch._int_mm(quantize_h(rows[t]), w_hh)  # (1, 4H) int32
                if inputs is not None:
                    acc = acc + inputs[t]
                gates = self._gates(layer, base[t] if inputs is None else self.bias[layer], acc.float())
                self._cell(gates, rows[t + 1], cl)
            h[layer].copy_(rows[T])
            below = out[1:]
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
