"""Corpus reading, the train/validation split, contiguous batching for truncated BPTT, and the
trainable-token mask of chat and prompt/completion data (lm/formats.py).

Batching follows pytorch/examples word_language_model: the token stream is cut into B
contiguous streams (one per batch row), so row b of window k+1 continues row b of window k
and the hidden state can be carried across windows. A mask, where there is one, is a (N,) bool
tensor beside the ids, split, batchified and windowed the same way, so each target has its flag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lm.errors import CorpusError
from lm.tokenizers import Tokenizer

# A text file with more than this share of control characters is treated as binary.
_MAX_CONTROL_SHARE = 0.01
_ALLOWED_CONTROLS = {"\n", "\r", "\t", "\f", "\v"}


def check_text(text: str, name: str = "corpus") -> str:
    """Reject text that cannot be a training corpus: empty or binary-looking."""
    if not text.strip():
        raise CorpusError(f"{name} is empty")
    if "\x00" in text:
        raise CorpusError(f"{name} looks binary (it contains NUL bytes); give a UTF-8 text file")
    sample = text[:100_000]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in _ALLOWED_CONTROLS)
    if controls > _MAX_CONTROL_SHARE * len(sample):
        raise CorpusError(f"{name} looks binary ({controls} control characters in the first {len(sample)})")
    return text


def decode_corpus(data: bytes, name: str = "corpus") -> str:
    """UTF-8 bytes -> text, with CorpusError for binary or non-UTF-8 input."""
    if b"\x00" in data[:100_000]:
        raise CorpusError(f"{name} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{name} is not valid UTF-8 (byte offset {e.start}); give a UTF-8 text file") from None
    return check_text(text.removeprefix("\ufeff"), name)


def read_corpus(path: Path | str) -> str:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path.name}", detail=str(path))
    return decode_corpus(path.read_bytes(), path.name)


def split_corpus(ids: Sequence[int] | Tensor, val_fraction: float) -> tuple[Tensor, Tensor]:
    """By position: the last `val_fraction` of the tokens validate (nanoGPT's Shakespeare split)."""
    data = torch.as_tensor(ids, dtype=torch.long)
    n_val = int(round(len(data) * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 2)
    return data[: len(data) - n_val], data[len(data) - n_val :]


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """(N,) -> (B, N // B): B contiguous streams; the ragged tail is dropped."""
    per_row = len(ids) // batch_size
    return ids[: per_row * batch_size].view(batch_size, per_row)


def epoch_offset(n: int, seed: int, epoch: int) -> int:
    """Where epoch `epoch`'s streams start in a corpus of n tokens: 0 for the first epoch, then an offset drawn
    from (seed, epoch), so a resumed run draws the same one. `rotate` by it before `batchify`."""
    if epoch == 0 or n < 2:
        return 0
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return int(torch.randint(n, (1,), generator=generator))


def rotate(ids: Tensor, offset: int) -> Tensor:
    """ids[offset:] followed by ids[:offset]: a new start for the same text; the seam is one more stream
    boundary, like those `batchify` makes."""
    return torch.cat((ids[offset:], ids[:offset])) if offset else ids


def windows(data: Tensor, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) windows of (B, t <= seq_len); y is x shifted by one token."""
    n = data.size(1) - 1
    for start in range(0, n, seq_len):
        t = min(seq_len, n - start)
        yield data[:, start : start + t], data[:, start + 1 : start + 1 + t]


def num_windows(data: Tensor, seq_len: int) -> int:
    n = data.size(1) - 1
    return max(0, (n + seq_len - 1) // seq_len)


def encode_segments(tokenizer: Tokenizer, pieces: Sequence[tuple[str, bool]]) -> tuple[Tensor, Tensor | None]:
    """(piece, trainable) pieces (lm/formats.py `segments`) -> the token ids (N,) and the trainable mask (N,),
    True where the loss counts the token as a target; the mask is None when every token counts (plain text),
    so plain text trains exactly as without formats.

    Each piece is encoded on its own, so a token never straddles a trainable and a context piece: the
    way serving encodes a prompt and then generates the answer after it."""
    if all(trainable for _, trainable in pieces):
        return torch.as_tensor(tokenizer.encode("".join(piece for piece, _ in pieces)), dtype=torch.long), None
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trainable in pieces:
        piece_ids = tokenizer.encode(piece)
        ids += piece_ids
        mask += [trainable] * len(piece_ids)
    return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.bool)
