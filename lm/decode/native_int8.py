"""The int8 decode step with its loops in C++ (lm/kernels/csrc/int8_step.cpp), built by lm/kernels/native.py.

Its int8 products are oneDNN's (`torch._int_mm` for one row, the packed `qlinear_pointwise` for
more) or, on a CPU with AVX-512 VNNI and for as many rows as the plan says, textgen's own
(lm/kernels/csrc/int8_vnni.cpp), split over the plan's threads. Every product gives the same
integer sums, so the plan (lm/decode/tune.py measures it) changes the speed, never the bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from torch import Tensor

from lm.batch_sampler import batch_bias
from lm.decode.fused import FusedStep
from lm.decode.quantize import Int8Matrix
from lm.model import LSTMLanguageModel
from lm.sampler import GREEDY_BELOW, SequenceSampler


class NativeInt8Step(FusedStep):
    """The int8 step with its loops in C++ (lm/kernels/csrc/int8_step.cpp's Int8Step, on this step's own
    tensors): the same bits as `FusedStep(int8=True)`, one call per step, batch of steps or prompt,
    with the GIL released for the whole call."""

    loops = "C++"

    def __init__(self, model: LSTMLanguageModel, module: ModuleType) -> None:
        super().__init__(model, int8=True)
        self.vnni_rows, self.threads = 0, 1
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

    @staticmethod
    def vnni_available(module: ModuleType) -> bool:
        """This CPU runs textgen's AVX-512 VNNI products."""
        return bool(module.Int8Step.vnni_available())

    def set_plan(self, vnni_rows: int, threads: int) -> None:
        """Textgen's VNNI products for batches of at most `vnni_rows` rows (0: oneDNN's for all), their
        output rows split over `threads` cores (the engine thread's torch threads must allow as many)."""
        self.native.set_plan(vnni_rows, threads)
        self.vnni_rows, self.threads = vnni_rows, threads

    def __call__(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self.native.step(tokens, h, c)

    def decode(
        self, tokens: Tensor, h: Tensor, c: Tensor, n: int, samplers: Sequence[SequenceSampler]
    ) -> tuple[Tensor, Tensor]:
        """n steps in one call, each row's next token chosen as `lm.batch_sampler.choose_batch` would
        (the rows must have no penalties, and no bias that varies from step to step) and fed back: ids
        (B, n) and the last step's logits (B, V), without the rows' bias.
        The same tokens, states and draws as n steps each followed by choose_batch."""
        params = [s.params for s in samplers]
        return self.native.decode(
            tokens,
            h,
            c,
            n,
            [p.temperature < GREEDY_BELOW for p in params],
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [s.generator for s in samplers],
            batch_bias(samplers),
        )

    def advance(self, tokens: Tensor, h: Tensor, c: Tensor) -> None:
        self.native.advance(tokens, h, c)

    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self.native.prefill(tokens, h, c)

    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
        return self.native.steps(ids, h, c)
