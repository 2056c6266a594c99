"""Tokenizers: text <-> token ids, saved as one exact JSON file (tokenizer.json).

Three kinds, all with an unknown token so that a prompt symbol outside the vocabulary
never fails a request:

- ``char``: one token per Unicode code point (works for Chinese as for English);
- ``word``: words, single punctuation marks and whitespace runs, so that
  ``decode(encode(x)) == x`` for in-vocabulary text; each CJK ideograph or kana is its
  own word, since those scripts do not separate words with spaces;
- ``bpe``: byte-level BPE trained on the corpus with the ``tokenizers`` library
  (the GPT-2 scheme: every byte is in the vocabulary, so any text encodes exactly).

Decoding works on bytes: every token contributes ``token_bytes(id)`` and the text is
their concatenation read as UTF-8. A byte-level BPE token may end in the middle of a
character; `StreamDecoder` holds such bytes back until the character completes.

The unknown token ``<unk>`` decodes to U+FFFD (the Unicode replacement character),
the same symbol a broken UTF-8 sequence decodes to: in both cases "something was here
that cannot be shown".
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm.errors import ConfigError, CorpusError

log = logging.getLogger(__name__)

UNK_TOKEN = "<unk>"
UNK_TEXT = "\ufffd"  # what the unknown token decodes to
UNK_BYTES = UNK_TEXT.encode("utf-8")
TOKENIZER_FILE = "tokenizer.json"
KINDS = ("char", "word", "bpe")
DEFAULT_BPE_VOCAB = 1024
MIN_BPE_VOCAB = 257  # the 256 byte symbols + <unk>

# CJK ideographs (+ extension A, compatibility) and Japanese kana: one token per character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Every character is \w, \s or neither, so the matches concatenate back to the text.
WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]|\s+")


class Tokenizer:
    """Base class. Subclasses set `kind` and `unk_id` and implement the vocabulary."""

    kind: str = ""
    unk_id: int = 0

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes this token contributes to the text (U+FFFD for the unknown token)."""
        raise NotImplementedError

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids that stand for no text: the unknown token (every kind's only special token; none has a
        pad, start or end token). Generation never samples them unless asked (lm/sampler.py)."""
        return (self.unk_id,)

    def decode(self, ids: Sequence[int]) -> str:
        # Same decoder and error handling as StreamDecoder, so streamed text == decode(ids).
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write tokenizer.json: into `path` when it is a folder, else to `path` itself."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")


class _VocabTokenizer(Tokenizer):
    """A tokenizer with an explicit token list; id 0 is always <unk>."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens or tokens[0] != UNK_TOKEN:
            raise ValueError(f"a {self.kind} vocabulary must start with {UNK_TOKEN}")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"the {self.kind} vocabulary has duplicate tokens")
        self.tokens = tokens
        self.unk_id = 0
        self._index = {t: i for i, t in enumerate(tokens)}
        self._bytes = [UNK_BYTES] + [t.encode("utf-8", errors="replace") for t in tokens[1:]]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._bytes[token_id]

    def _ids(self, pieces: list[str] | str) -> list[int]:
        return [self._index.get(p, self.unk_id) for p in pieces]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "unk_token": UNK_TOKEN, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        if d.get("kind") != cls.kind:
            raise ValueError(f"expected a {cls.kind!r} tokenizer, found kind {d.get('kind')!r}")
        tokens = d["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("'tokens' must be a list of strings")
        return cls(tokens)


def _keep_most_frequent(counts: Counter[str], vocab_size: int | None) -> list[str]:
    """[<unk>] + the (vocab_size - 1) most frequent symbols, sorted; ties go to the smaller symbol."""
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    if vocab_size is not None:
        ranked = ranked[: vocab_size - 1]
    return [UNK_TOKEN, *sorted(ranked)]


class CharTokenizer(_VocabTokenizer):
    kind = "char"

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None) -> CharTokenizer:
        return cls(_keep_most_frequent(Counter(text), vocab_size))

    def encode(self, text: str) -> list[int]:
        return self._ids(text)


class WordTokenizer(_VocabTokenizer):
    kind = "word"

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None) -> WordTokenizer:
        return cls(_keep_most_frequent(Counter(WORD_RE.findall(text)), vocab_size))

    def encode(self, text: str) -> list[int]:
        return self._ids(WORD_RE.findall(text))


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]  # control bytes, space, ... -> U+0100 onwards
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (models.BPE + ByteLevel pre-tokenizer and decoder) from the tokenizers library."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer) -> None:
        unk_id = hf.token_to_id(UNK_TOKEN)
        if unk_id is None:
            raise ValueError(f"the BPE vocabulary has no {UNK_TOKEN} token")
        # A literal "<unk>" typed in a prompt is text, not the special token.
        hf.encode_special_tokens = True
        self._hf = hf
        self.unk_id = unk_id
        self._bytes = [self._piece_bytes(i) for i in range(hf.get_vocab_size(with_added_tokens=True))]

    def _piece_bytes(self, token_id: int) -> bytes:
        if token_id == self.unk_id:
            return UNK_BYTES
        piece = self._hf.id_to_token(token_id)
        if piece is None or any(c not in _UNICODE_TO_BYTE for c in piece):
            raise ValueError(f"BPE token {token_id} ({piece!r}) is not a byte-level token")
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None) -> BPETokenizer:
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        if vocab_size < MIN_BPE_VOCAB:
            raise ConfigError(
                f"a bpe vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes + {UNK_TOKEN}), got {vocab_size}",
                "vocab_size",
            )
        hf = HFTokenizer(models.BPE(unk_token=UNK_TOKEN))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[UNK_TOKEN],  # id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
            show_progress=False,
        )
        hf.train_from_iterator(_lines(text), trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._bytes[token_id]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "unk_token": UNK_TOKEN, "tokenizer": self._hf.to_str()}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        if d.get("kind") != cls.kind:
            raise ValueError(f"expected a 'bpe' tokenizer, found kind {d.get('kind')!r}")
        return cls(HFTokenizer.from_str(d["tokenizer"]))


def _lines(text: str) -> Iterator[str]:
    """Feed the BPE trainer line by line rather than as one huge string."""
    yield from text.splitlines(keepends=True)


_CLASSES: dict[str, type[CharTokenizer] | type[WordTokenizer] | type[BPETokenizer]] = {
    "char": CharTokenizer,
    "word": WordTokenizer,
    "bpe": BPETokenizer,
}


def fit_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Build a `kind` tokenizer from the corpus. vocab_size counts <unk>; None = every symbol (bpe: 1024)."""
    if kind not in _CLASSES:
        raise ConfigError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}", "tokenizer")
    if vocab_size is not None and vocab_size < 2:
        raise ConfigError(f"vocab_size must be at least 2, got {vocab_size}", "vocab_size")
    if not text:
        raise CorpusError("cannot fit a tokenizer on an empty corpus")
    tokenizer = _CLASSES[kind].fit(text, vocab_size)
    log.info("fitted %s tokenizer: %d tokens", kind, tokenizer.vocab_size)
    return tokenizer


def planned_vocab_size(kind: str, text: str, vocab_size: int | None = None) -> int:
    """The vocabulary size `fit_tokenizer(kind, text, vocab_size)` makes, without fitting (a cheap scan).

    char and word: exact (their distinct symbols and <unk>, capped). bpe: the size the trainer is
    asked for (default 1024); it stops short of it only on a corpus with too few distinct pairs.
    """
    if kind == "char":
        distinct = len(set(text))
    elif kind == "word":
        distinct = len(set(WORD_RE.findall(text)))
    else:
        return DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
    return distinct + 1 if vocab_size is None else min(distinct + 1, vocab_size)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from `to_dict()` output; ValueError when the dict is not one."""
    if not isinstance(d, dict) or d.get("kind") not in _CLASSES:
        found = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"unknown tokenizer kind {found!r}; expected one of {', '.join(KINDS)}")
    return _CLASSES[d["kind"]].from_dict(d)


def load_tokenizer(path: Path) -> Tokenizer:
    """Read tokenizer.json (`path` is the file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))


class StreamDecoder:
    """Incremental detokenizer for streaming.

    Token bytes go through one incremental UTF-8 decoder, so a byte-level BPE piece that
    ends in the middle of a character yields nothing until the character completes.
    push() over ids plus flush() concatenates to exactly `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The complete characters this token finishes (possibly '')."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back: U+FFFD for a dangling partial character, else ''."""
        return self._utf8.decode(b"", final=True)
