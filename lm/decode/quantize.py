"""int8 arithmetic of the int8 decode step: per-row weight codes, the h codes, the exact integer products."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

H_SCALE = 127.0  # int8 code of h = round(h * 127); |h| <= 1


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) fp32 -> int8 codes (out, in), row-major, and one scale per output row (out,), symmetric."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return codes, scale


def quantize_h(x: Tensor) -> Tensor:
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
            if not torch.equal(self._packed_mm(probe), torch._int_mm(quantize_h(probe), self.t).float()):
                log.warning("oneDNN's packed int8 GEMM disagrees with _int_mm here; using _int_mm only")
                self.packed = None
        except (AttributeError, RuntimeError):
            self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None or x.shape[0] == 1:
            return torch._int_mm(quantize_h(x), self.t).float()
        return self._packed_mm(x)

    def _packed_mm(self, x: Tensor) -> Tensor:
        codes = torch.round(x * H_SCALE).add_(128).to(torch.uint8)  # round first: exactly the int8 codes + 128
        return torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 128, self.packed, self.w_scales, self.w_zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )
