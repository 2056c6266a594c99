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
"""

from __future__ import annotations

import array
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

ENTRY_OVERHEAD_BYTES = 400  # the Python objects around an entry's tensors and key, roughly


def key_bytes(ids: list[int]) -> bytes:
    """Token ids -> a compact, comparable key (4 bytes per id)."""
    return array.array("I", ids).tobytes()


@dataclass
class CacheEntry:
    key: bytes  # key_bytes(prefix ids)
    h: Tensor  # (layers, H)
    c: Tensor  # (layers, H)
    logits: Tensor  # (V,) of the prefix's last position
    nbytes: int

    @property
    def length(self) -> int:
        return len(self.key) // 4


class PromptCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 32) -> None:
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self.nbytes = 0
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()  # least recently used first
        self._buckets: dict[bytes, set[bytes]] = {}  # key of the first min_tokens ids -> entry keys

    def __len__(self) -> int:
        return len(self._entries)

    def _bucket(self, key: bytes) -> bytes:
        return key[: 4 * self.min_tokens]

    def lookup(self, ids: list[int]) -> CacheEntry | None:
        """The entry with the longest key that is a prefix of `ids` (possibly all of it), or None."""
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
        """Keep the state after `ids`: h, c (layers, H), logits (V,), all copied. Returns the bytes added."""
        if len(ids) < self.min_tokens:
            return 0
        key = key_bytes(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return 0
        h, c, logits = h.detach().clone(), c.detach().clone(), logits.detach().clone()
        nbytes = len(key) + ENTRY_OVERHEAD_BYTES + sum(t.numel() * t.element_size() for t in (h, c, logits))
        if nbytes > self.budget_bytes:
            return 0
        self._entries[key] = CacheEntry(key, h, c, logits, nbytes)
        self._buckets.setdefault(self._bucket(key), set()).add(key)
        self.nbytes += nbytes
        freed = self._evict()
        return nbytes - freed

    def _evict(self) -> int:
        freed = 0
        while self.nbytes > self.budget_bytes:
            key, entry = self._entries.popitem(last=False)
            bucket = self._buckets[self._bucket(key)]
            bucket.discard(key)
            if not bucket:
                del self._buckets[self._bucket(key)]
            self.nbytes -= entry.nbytes
            freed += entry.nbytes
        return freed

    def clear(self) -> int:
        """Drop everything; returns the bytes freed."""
        freed = self.nbytes
        self._entries.clear()
        self._buckets.clear()
        self.nbytes = 0
        return freed
