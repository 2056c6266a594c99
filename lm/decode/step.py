"""The decode step's interface, and the batched-steps loop the Python steps share."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Step(Protocol):
    kind: str
    loops: str  # "C++" or "Python": where the step's loops run (lm/kernels/native.py)

    def __call__(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor: ...

    def advance(self, tokens: Tensor, h: Tensor, c: Tensor) -> None: ...

    def prefill(self, tokens: Tensor, h: Tensor, c: Tensor) -> Tensor: ...

    def steps(self, ids: Tensor, h: Tensor, c: Tensor) -> Tensor: ...


def run_steps(step: Step, ids: Tensor, h: Tensor, c: Tensor) -> Tensor:
    """ids (k, n) -> n steps of k sequences, the head on the last only -> logits (k, V)."""
    for t in range(ids.shape[1] - 1):
        step.advance(ids[:, t], h, c)
    return step(ids[:, -1], h, c)
