"""The reference decode step: the model's own forward (Embedding -> nn.LSTM -> Linear), one token per call.

On CPU each nn.LSTM call re-formats its weights for oneDNN, so one step costs about a millisecond at
B=1; it is the slow, obviously right step the others are checked against (and the one that runs on
a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lm.decode.step import run_steps
from lm.model import LSTMLanguageModel


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
        return run_steps(self, ids, h, c)

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
