"""Constrained decoding: text that must match a regex, one of a list of choices, a JSON schema or a grammar.

The library is llguidance (https://github.com/guidance-ai/llguidance), chosen by measurement over
outlines-core and xgrammar on textgen's three tokenizer kinds (bench/constraints.py; the figures are
in docs/API.md, "Constrained output"): it compiles in about a millisecond (it computes masks lazily,
per step, from a token trie), its per-token mask costs tens of microseconds, it enforces the most of
JSON Schema and refuses, with a message, what it cannot enforce, and it depends on nothing.

How a sequence is constrained (lm/sampler.py holds the sampler side):
- `ConstraintCompiler` (one per tokenizer) turns a `Constraint` into a `CompiledConstraint` once and
  keeps the last `cache_size` of them (an LRU); compiling also computes the first step's mask, so a
  constraint that no token of the vocabulary can start is refused at once ("cannot spell").
- Each sequence gets its own `ConstraintState`. Before each step it offers `row`: (V,) float32, -inf
  at every token the grammar does not allow next, added to the logits with the sequence's other bias.
- Where the grammar accepts the text so far but allows more (regex "[0-9]+" after a digit), `row` is
  None: nothing is masked, and a sampled token the grammar does not allow ends the sequence instead of
  being emitted. textgen's models have no end-of-text token; this gives "the end" the probability the
  model puts on leaving the grammar, as an end token would have (and greedy decoding stops where the
  model's first choice leaves it).
- When the grammar allows nothing more (a JSON object's closing brace), the sequence is complete.
  When it allows no token of this vocabulary and does not accept (a literal the vocabulary cannot
  spell, met late), it is a dead end: the sequence ends there with the valid prefix, as at max_tokens.

The vocabulary given to llguidance is each token's bytes (`Tokenizer.token_bytes`); the tokenizer's
special tokens (the unknown token) are marked special, so no grammar ever allows them. llguidance
tokenizes forced text with the tokenizer, and assumes that any byte string can be tokenized (true
of byte-level BPE, not of char and word vocabularies): 256 single-byte tokens are appended past the
model's vocabulary for that, and never offered to the model (the masks are cut at its size).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark
from torch import Tensor

from lm.errors import ConfigError
from lm.tokenizers import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

KINDS = ("regex", "choice", "json", "grammar")
CACHE_SIZE = 256  # compiled constraints kept per tokenizer
MAX_CHOICES = 1024
# Rust regex (llguidance's syntax) metacharacters: a choice is matched literally, each escaped
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")
# JSON as textgen writes it: no whitespace between tokens (whitespace is text a small model wanders
# into; json.dumps(obj, separators=(",", ":")) is the same form)
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What the text must match. `text` is the regex or grammar, or the JSON text of the choice list or the
    schema (keys sorted, so that equal schemas are one cache entry). `param` names the request field it
    came from, for error messages; it takes no part in equality."""

    kind: str
    text: str
    param: str = field(default="structured_outputs", compare=False)

    @classmethod
    def regex(cls, pattern: str, param: str = "structured_outputs.regex") -> Constraint:
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: list[str], param: str = "structured_outputs.choice") -> Constraint:
        if not choices or len(choices) > MAX_CHOICES:
            raise ConfigError(f"a choice list holds 1 to {MAX_CHOICES} strings, got {len(choices)}", param)
        if not all(isinstance(c, str) for c in choices):
            raise ConfigError("every choice must be a string", param)
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), param)

    @classmethod
    def json(cls, schema: dict[str, Any] | bool | None = None, param: str = "structured_outputs.json") -> Constraint:
        """A JSON schema (None: any JSON object, OpenAI's json_object)."""
        schema = {"type": "object"} if schema is None else schema
        if not isinstance(schema, dict | bool):
            raise ConfigError("a JSON schema is a JSON object (or true/false)", param)
        return cls("json", json.dumps(schema, sort_keys=True, ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: str, param: str = "structured_outputs.grammar") -> Constraint:
        """A Lark grammar (llguidance's syntax), or a GBNF one (llama.cpp's, converted to Lark)."""
        return cls("grammar", text, param)

    def to_llguidance(self) -> str:
        """The grammar llguidance compiles. ConfigError when it cannot be built (a malformed GBNF)."""
        matcher = llguidance.LLMatcher
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.text)
        if self.kind == "choice":
            return matcher.grammar_from_regex("|".join(_literal(c) for c in json.loads(self.text)))
        if self.kind == "json":
            return matcher.grammar_from_json_schema(self.text, defaults=_JSON_OPTIONS)
        if self.kind == "grammar":
            try:
                return matcher.grammar_from_lark(any_to_lark(self.text))
            except Exception as e:  # the GBNF converter's own errors (a pure-Python parser)
                raise ConfigError(_first_line(str(e)), self.param) from None
        raise ConfigError(f"unknown constraint kind {self.kind!r}; one of {', '.join(KINDS)}", self.param)


def _literal(text: str) -> str:
    """`text` as a regex that matches exactly it."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _first_line(message: str) -> str:
    """llguidance's message as one line for a client: its first line, and the parser's own "error:" line
    when it has one (a regex's); never the parser-state dump some messages carry after "<state>"."""
    lines = [line.strip() for line in message.split("<state>")[0].splitlines() if line.strip()]
    if not lines:
        return "rejected"
    cause = next((line for line in lines[1:] if line.startswith("error:")), None)
    text = f"{lines[0]} {cause}" if cause else lines[0]
    return text[:500]


class Vocabulary:
    """One tokenizer's vocabulary in llguidance's form: ids 0..V-1 the model's tokens, V a virtual end
    token (llguidance needs one; "accepting" reads as its mask bit), V+1..V+256 the byte fallbacks."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        size = tokenizer.vocab_size
        specials = {i for i in tokenizer.special_ids if 0 <= i < size}
        tokens = [b"\xff<special_%d>" % i if i in specials else tokenizer.token_bytes(i) for i in range(size)]
        tokens.append(b"\xff<end>")  # id `size`
        tokens += [bytes([b]) for b in range(256)]
        self.size = size
        self.end_id = size
        self.words = (len(tokens) + 31) // 32  # int32 words of one mask
        spelled = {t: i for i, t in reversed(list(enumerate(tokens))) if i not in specials and i != size and t}
        wrapper = llguidance.TokenizerWrapper(_Encoder(tokenizer, tokens, sorted(specials | {size}), spelled))
        self.lltokenizer = llguidance.LLTokenizer(wrapper)


class _Encoder:
    """The tokenizer as llguidance's TokenizerWrapper calls it: bytes -> ids. The tokenizer's own encoding
    when it spells the text exactly, else a greedy longest match over the tokens and the byte fallbacks."""

    bos_token_id = None

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], specials: list[int], spelled: dict[bytes, int]):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.eos_token_id = tokenizer.vocab_size
        self.special_token_ids = specials
        self._spelled = spelled
        self._longest = max(len(t) for t in spelled)

    def __call__(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", errors="replace")
        ids = self.tokenizer.encode(text)
        if text.encode("utf-8") == data and self.tokenizer.decode(ids) == text:
            return ids
        out, i = [], 0
        while i < len(data):  # every single byte is spelled (the fallbacks): this always advances
            n = next(n for n in range(min(self._longest, len(data) - i), 0, -1) if data[i : i + n] in self._spelled)
            out.append(self._spelled[data[i : i + n]])
            i += n
        return out


@dataclass
class _Mask:
    """One step's mask over the model's vocabulary: `allowed` (V,) bool; `additive` (V,) float32, 0 where
    allowed and -inf elsewhere; `any`: some token is allowed; `accepting`: the grammar accepts the text so
    far (it may end here)."""

    allowed: np.ndarray
    additive: Tensor
    any: bool
    accepting: bool

    def row(self) -> Tensor | None:
        """What to add to the logits: `additive`, or None where nothing is masked (the grammar accepts, so
        a token it does not allow ends the sequence instead: see the module doc)."""
        return None if self.accepting else self.additive


def _masks(matchers: list[Any], vocab: Vocabulary) -> list[_Mask]:
    """The next step's mask of each matcher, with one pass of numpy over all of them: a batch's constrained
    rows pay the conversion once. (llguidance's LLExecutor computes masks on a thread pool: 8 masks took
    0.3 ms through it on 2 cores, against 40 us one after the other, each a few microseconds without the GIL.)"""
    words = np.zeros((len(matchers), vocab.words), dtype=np.int32)
    nbytes, address = vocab.words * 4, words.ctypes.data  # (`ctypes.data` costs microseconds: once)
    for i, m in enumerate(matchers):
        m.unsafe_compute_mask_ptr(address + i * nbytes, nbytes)  # drops the GIL
    errors = [m.is_error() for m in matchers]  # llguidance's "no token allowed" (or a forced byte no token spells)
    words[errors] = 0
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    allowed = bits[:, : vocab.size].astype(bool)
    additive = torch.from_numpy(np.where(allowed, np.float32(0.0), np.float32("-inf")))  # (k, V)
    some = np.any(allowed, axis=1).tolist()
    return [
        _Mask(allowed[i], additive[i], some[i], accepting=bool(bits[i, vocab.end_id]) or m.is_accepting())
        for i, m in enumerate(matchers)
    ]


@dataclass(eq=False)
class CompiledConstraint:
    """A constraint compiled for one vocabulary: a matcher in its first state and that state's mask.
    Shared by every sequence that uses the constraint; `start()` gives each its own state."""

    constraint: Constraint
    vocab: Vocabulary
    matcher: Any  # llguidance.LLMatcher, never advanced: states are copies
    first: _Mask

    def start(self) -> ConstraintState:
        return ConstraintState(self)


class ConstraintState:
    """One sequence's place in its constraint. Call `allows(id)` on the sampled token, then `advance(id)`.

    After each advance: `row` is the next step's additive mask (None: nothing masked), `complete` says the
    grammar allows nothing more (the sequence is done), `dead_end` that no token of the vocabulary
    continues it and the text so far is not accepted (the sequence ends with what it has)."""

    def __init__(self, compiled: CompiledConstraint) -> None:
        self._vocab = compiled.vocab
        self._matcher = compiled.matcher.deep_copy()
        self._mask = compiled.first
        self.row = compiled.first.row()
        self.complete = False
        self.dead_end = False

    @property
    def accepting(self) -> bool:
        return self._mask.accepting

    def allows(self, token_id: int) -> bool:
        return 0 <= token_id < self._vocab.size and bool(self._mask.allowed[token_id])

    def advance(self, token_id: int) -> None:
        """Consume an allowed token; compute the next step's mask."""
        self._consume(token_id)
        self._update(_masks([self._matcher], self._vocab)[0])

    def _consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"the constraint refused token {token_id}: {_first_line(self._matcher.get_error())}")

    def _update(self, mask: _Mask) -> None:
        self._mask = mask
        self.row = mask.row()
        self.complete = self._matcher.is_stopped() or (not mask.any and mask.accepting)
        self.dead_end = not mask.any and not mask.accepting


def advance_all(states: list[ConstraintState], token_ids: list[int]) -> list[bool]:
    """`advance` each state whose token it allows, the next masks computed in one call (`_masks`); which
    were advanced. A state left alone is for its sampler to refuse (lm/sampler.py `SequenceSampler.push`)."""
    moved = [s.allows(t) for s, t in zip(states, token_ids, strict=True)]
    moving = [(s, t) for s, t, m in zip(states, token_ids, moved, strict=True) if m]
    for s, t in moving:
        s._consume(t)
    by_vocab: dict[int, list[ConstraintState]] = {}
    for s, _ in moving:
        by_vocab.setdefault(id(s._vocab), []).append(s)
    for group in by_vocab.values():
        for s, mask in zip(group, _masks([s._matcher for s in group], group[0]._vocab), strict=True):
            s._update(mask)
    return moved


class ConstraintCompiler:
    """Compiles constraints for one tokenizer, keeping the last `cache_size` compiled (thread-safe).

    The llguidance vocabulary is built on first use (tens of milliseconds for a few thousand tokens);
    compiling a constraint takes about a millisecond, a large JSON schema a few (bench/constraints.py),
    so callers on an event loop run `compile` in a thread when `cached` returns None."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._vocab: Vocabulary | None = None
        self._cache: OrderedDict[Constraint, CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocab(self) -> Vocabulary:
        with self._lock:
            if self._vocab is None:
                self._vocab = Vocabulary(self.tokenizer)
            return self._vocab

    def cached(self, constraint: Constraint) -> CompiledConstraint | None:
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
            return compiled

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The compiled constraint, from the cache or built now. ConfigError (naming `constraint.param`)
        for an invalid regex, schema or grammar (the library's message), or one no token can start."""
        compiled = self.cached(constraint)
        if compiled is not None:
            return compiled
        compiled = _compile(constraint, self.vocab)
        with self._lock:
            self._cache[constraint] = compiled
            self._cache.move_to_end(constraint)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._cache)


def _compile(constraint: Constraint, vocab: Vocabulary) -> CompiledConstraint:
    try:
        grammar = constraint.to_llguidance()
    except ValueError as e:  # grammar_from_json_schema: not a JSON object
        raise ConfigError(f"invalid {constraint.kind}: {_first_line(str(e))}", constraint.param) from None
    matcher = llguidance.LLMatcher(vocab.lltokenizer, grammar, log_level=0)
    if matcher.is_error():
        message = _first_line(matcher.get_error())
        raise ConfigError(f"invalid {_NAMES[constraint.kind]}: {message}", constraint.param)
    first = _masks([matcher], vocab)[0]
    if not first.any and not first.accepting:
        raise ConfigError(
            f"the model's vocabulary cannot spell any text that matches this {_NAMES[constraint.kind]}: "
            "no token of it can start one",
            constraint.param,
        )
    log.debug("compiled %s constraint (%d chars)", constraint.kind, len(constraint.text))
    return CompiledConstraint(constraint, vocab, matcher, first)


_NAMES = {"regex": "regex", "choice": "choice list", "json": "JSON schema", "grammar": "grammar"}
