"""The LSTM state of every running sequence, in two preallocated tensors the decode step works on in place."""

from __future__ import annotations

import torch

from app.engine.events import State


class StateSlots:
    """The LSTM state of every running sequence, in preallocated tensors h and c, each (layers, slots, H).

    The running sequences occupy rows 0..used-1, so a decode step works on the views
    h[:, :used], c[:, :used] in place. Removing a row moves the last row into its place.
    """

    def __init__(self, layers: int, hidden: int, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        self.h = torch.zeros(layers, slots, hidden, device=device, dtype=dtype)
        self.c = torch.zeros(layers, slots, hidden, device=device, dtype=dtype)
        self.device = device
        self.used = 0

    @property
    def available(self) -> int:
        return self.h.shape[1] - self.used

    def rows(self) -> State:
        """Views (layers, used, H) of the running rows."""
        return self.h[:, : self.used], self.c[:, : self.used]

    def add(self, state: State) -> int:
        """state: (h, c) of one sequence, each (layers, 1, H) or (layers, H). Returns its row."""
        row = self.used
        self.h[:, row] = state[0].reshape(self.h.shape[0], -1)
        self.c[:, row] = state[1].reshape(self.c.shape[0], -1)
        self.used += 1
        return row

    def read(self, row: int) -> State:
        """Views (layers, H) of one row."""
        return self.h[:, row], self.c[:, row]

    def remove(self, row: int) -> int | None:
        """Free `row`; the last row moves into it. Returns the row that moved (None if it was the last)."""
        last = self.used - 1
        self.used = last
        if row == last:
            return None
        self.h[:, row] = self.h[:, last]
        self.c[:, row] = self.c[:, last]
        return last
