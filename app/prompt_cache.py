"""The prompt-state cache: the LSTM state after a token prefix, kept so a longer prompt runs only its new part.

An LSTM's whole memory of a prefix is its (h, c) state: (layers, H) twice, 8 KB for the default
model, whatever the prefix length. So each engine (one model version) keeps

    token prefix -> (h, c) after it, and the logits of its last position

in an LRU under a byte budget. A prompt looks up the LONGEST cached prefix of its token ids and
prefills only the rest; a prompt equal to a cached prefix needs no model call at all (its first
token is sampled from the cached logits). The engine stores the state at the end of every prompt
and at the end of every completion (prompt + generated tokens), so a chat's next turn, whose
prompt is the previous prompt + the reply + the new message, runs only the new message.

Lookup: entries are bucketed by their first `min_tokens` ids (shorter prefixes are not worth a
cache entry: they prefill in about a millisecond); a prompt scans its bucket for keys that are a
prefix of it (bytes.startswith, in C). Only the engine thread uses a cache, so nothing is locked.

Storage: one slab tensor (rows, 2 * layers * H + V), allocated once (its pages are touched as rows
fill) with a free list of rows. Thousands of separately allocated 8-KB tensors, living among the
engine's short-lived ones, fragmented the allocator: a 16 MB cache grew the process by 90 MB.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

ENTRY_OVERHEAD_BYTES = 200  # the Python objects around an entry's key and row, roughly


def key_bytes(ids: list[int]) -> bytes:
    """Token ids -> a compact, comparable key (4 bytes per id)."""
    return array.array("I", ids).tobytes()


@dataclass
class CacheEntry:
    key: bytes  # key_bytes(prefix ids)
    row: int  # its row of the slab
    h: Tensor  # (layers, H), a view of the row: copy before the entry can be evicted
    c: Tensor  # (layers, H)
    logits: Tensor  # (V,) of the prefix's last position
    nbytes: int

    @property
    def length(self) -> int:
        return len(self.key) // 4


class PromptCache:
    def __init__(
        self,
        budget_bytes: int,
        *,
        layers: int,
        hidden: int,
        vocab: int,
        device: torch.device | None = None,
        min_tokens: int = 32,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self._shape = (layers, hidden)
        self._width = 2 * layers * hidden + vocab
        row_bytes = self._width * 4
        self.row_bytes = row_bytes
        rows = max(1, budget_bytes // row_bytes)
        self._slab = torch.empty(rows, self._width, device=device)  # untouched pages cost nothing
        self._free = list(range(self._slab.shape[0] - 1, -1, -1))
        self.nbytes = 0
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()  # least recently used first
        self._buckets: dict[bytes, set[bytes]] = {}  # key of the first min_tokens ids -> entry keys

    def __len__(self) -> int:
        return len(self._entries)

    def _bucket(self, key: bytes) -> bytes:
        return key[: 4 * self.min_tokens]

    def lookup(self, ids: list[int]) -> CacheEntry | None:
        """The entry with the longest key that is a prefix of `ids` (possibly all of it), or None.

        Its tensors are views of the slab: copy them before the next `put`, which may reuse the row."""
        if len(ids) < self.min_tokens:
            return None
        key = key_bytes(ids)
        best: CacheEntry | None = None
        for candidate in self._buckets.get(self._bucket(key), ()):
            if len(candidate) <= len(key) and key.startswith(candidate):
                entry = self._entries[candidate]
                if best is None or entry.length > best.length:
                    best = entry
        if best is not None:
            self._entries.move_to_end(best.key)
        return best

    def put(self, ids: list[int], h: Tensor, c: Tensor, logits: Tensor) -> int:
        """Keep the state after `ids`: h, c (layers, H), logits (V,), copied. Returns the bytes added."""
        if len(ids) < self.min_tokens:
            return 0
        key = key_bytes(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return 0
        nbytes = self.row_bytes + len(key) + ENTRY_OVERHEAD_BYTES
        if nbytes > self.budget_bytes:
            return 0
        freed = self._evict(nbytes)
        row = self._free.pop()
        layers, hidden = self._shape
        n = layers * hidden
        slab = self._slab[row]
        slab[:n] = h.reshape(-1)
        slab[n : 2 * n] = c.reshape(-1)
        slab[2 * n :] = logits
        entry = CacheEntry(
            key, row, slab[:n].view(layers, hidden), slab[n : 2 * n].view(layers, hidden), slab[2 * n :], nbytes
        )
        self._entries[key] = entry
        self._buckets.setdefault(self._bucket(key), set()).add(key)
        self.nbytes += nbytes
        return nbytes - freed

    def _evict(self, room: int) -> int:
        """Drop the least recently used entries until `room` bytes and a row are free; returns the bytes freed."""
        freed = 0
        while self._entries and (self.nbytes + room > self.budget_bytes or not self._free):
            key, entry = self._entries.popitem(last=False)
            bucket = self._buckets[self._bucket(key)]
            bucket.discard(key)
            if not bucket:
                del self._buckets[self._bucket(key)]
            self._free.append(entry.row)
            self.nbytes -= entry.nbytes
            freed += entry.nbytes
        return freed

    def clear(self) -> int:
        """Drop everything; returns the bytes freed."""
        freed = self.nbytes
        self._entries.clear()
        self._buckets.clear()
        self._free = list(range(self._slab.shape[0] - 1, -1, -1))
        self.nbytes = 0
        return freed
