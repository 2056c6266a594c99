"""Constrained decoding: the libraries compared on textgen's tokenizers, and the chosen one's costs.

    python bench/constraints.py                 # llguidance (textgen's, through lm/constrain.py)
    pip install outlines-core xgrammar          # optional: then they are measured beside it
    python bench/constraints.py --no-write      # print only

Tokenizers: the shipped models' (char) and, fitted on data/shakespeare, a word (8,192) and a BPE (4,096)
one. For each library and tokenizer: the one-time vocabulary setup; the compile time (to the first
mask) of a regex, a choice list and a 10-property JSON schema; the per-token mask time (median over
random walks through the grammar, each step's allowed token chosen at random). Schema coverage: each
JSON-schema feature compiled on the BPE vocabulary and walked 12 times, every finished text checked
with jsonschema_rs: "yes" (all valid), "refused" (the library says it cannot), "ignored n/m" (it
compiled, and n of m texts break the schema), "?" (no walk finished in 300 steps).
One thread (torch and the libraries' own pools where they have one).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from results import machine_summary, write_section  # noqa: E402

from lm import constrain  # noqa: E402
from lm.tokenizers import Tokenizer, fit_tokenizer, load_tokenizer  # noqa: E402

REGEX = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
CHOICES = ["positive", "negative", "neutral"]
SCHEMA10 = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 15},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "nickname": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "level": {"type": "integer"},
    },
    "required": ["name", "age", "email", "score", "active", "tags", "role", "address", "nickname", "level"],
    "additionalProperties": False,
}
CONSTRAINTS = {"regex": REGEX, "choice": CHOICES, "json": SCHEMA10}
FEATURES: dict[str, Any] = {
    "enum, const": {"type": "array", "prefixItems": [{"enum": ["red", 3, None]}, {"const": "x"}], "items": False},
    "optional properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "array min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 4}, {"type": "integer"}]},
    "string min/maxLength": {"type": "string", "minLength": 3, "maxLength": 6},
    "pattern": {"type": "string", "pattern": "^[a-c]{2}[0-9]$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format uuid": {"type": "string", "format": "uuid"},
    "integer minimum/maximum": {"type": "integer", "minimum": 10, "maximum": 20},
    "number exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "multipleOf": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ]
    },
    "$ref/$defs": {
        "$defs": {"p": {"type": "integer", "minimum": 0, "maximum": 9}},
        "type": "array",
        "items": {"$ref": "#/$defs/p"},
    },
    "recursive $ref": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "type list": {"type": ["integer", "null"]},
    "uniqueItems": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "uniqueItems": True},
    "not": {"not": {"type": "integer"}},
    "if/then/else": {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "if": {"properties": {"a": {"minimum": 5}}},
        "then": {"required": ["b"]},
        "else": {"required": ["c"]},
    },
}


def choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class Llguidance:
    """textgen's own path: lm/constrain.py (the vocabulary with byte fallbacks, the first mask at compile)."""

    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab = constrain.Vocabulary(tokenizer)

    def compile(self, kind: str, spec: Any) -> Any:
        make = {
            "regex": constrain.Constraint.regex,
            "choice": constrain.Constraint.choice,
            "json": constrain.Constraint.json,
        }
        return constrain._compile(make[kind](spec), self.vocab)

    def start(self, compiled: Any) -> Any:
        return compiled.start()

    def allowed(self, state: Any) -> tuple[np.ndarray, bool]:
        return np.flatnonzero(state._mask.allowed), state._mask.accepting

    def step(self, state: Any, token: int) -> tuple[np.ndarray, bool, bool]:
        """Consume, then compute the next mask (timed: this is the per-token cost)."""
        state.advance(token)
        return np.flatnonzero(state._mask.allowed), state._mask.accepting, state.complete


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.size = tokenizer.vocab_size
        specials = set(tokenizer.special_ids)
        tokens = [b"" if i in specials else tokenizer.token_bytes(i) for i in range(self.size)] + [b""]
        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=self.size + 1, stop_token_ids=[self.size])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            compiled = self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        else:
            compiled = self.compiler.compile_regex(spec if kind == "regex" else choice_regex(spec))
        self._mask(self.xgr.GrammarMatcher(compiled))
        return compiled

    def start(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def _mask(self, matcher: Any) -> tuple[np.ndarray, bool]:
        bitmask = self.xgr.allocate_token_bitmask(1, self.size + 1)
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: self.size + 1]
        return np.flatnonzero(bits[: self.size]), bool(bits[self.size])

    def allowed(self, matcher: Any) -> tuple[np.ndarray, bool]:
        return self._mask(matcher)

    def step(self, matcher: Any, token: int) -> tuple[np.ndarray, bool, bool]:
        assert matcher.accept_token(token)
        allowed, accepting = self._mask(matcher)
        return allowed, accepting, matcher.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer: Tokenizer) -> None:
        import outlines_core

        self.oc = outlines_core
        self.size = tokenizer.vocab_size
        specials = set(tokenizer.special_ids)
        spelled: dict[bytes, list[int]] = {}
        for i in range(self.size):
            if i not in specials:
                spelled.setdefault(tokenizer.token_bytes(i), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(self.size, spelled)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
        else:
            regex = spec if kind == "regex" else choice_regex(spec)
        return self.oc.Index(regex, self.vocabulary)  # the whole token-level automaton, up front

    def start(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def _mask(self, guide: Any) -> tuple[np.ndarray, bool]:
        mask = torch.zeros((1, (self.size + 1 + 31) // 32), dtype=torch.int32)
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: self.size + 1]
        return np.flatnonzero(bits[: self.size]), bool(bits[self.size])

    def allowed(self, guide: Any) -> tuple[np.ndarray, bool]:
        return self._mask(guide)

    def step(self, guide: Any, token: int) -> tuple[np.ndarray, bool, bool]:
        guide.advance(token)
        allowed, accepting = self._mask(guide)
        return allowed, accepting, guide.is_finished()


def libraries() -> list[type]:
    found: list[type] = [Llguidance]
    for cls, module in ((Xgrammar, "xgrammar"), (OutlinesCore, "outlines_core")):
        try:
            __import__(module)
            found.append(cls)
        except ImportError:
            print(f"({module} is not installed: not measured)")
    return found


def walk(lib: Any, compiled: Any, rng: random.Random, steps: int = 300) -> tuple[list[float], list[int], bool]:
    """A random walk through the grammar: (per-token mask seconds, the ids, whether it finished)."""
    state = lib.start(compiled)
    allowed, accepting = lib.allowed(state)
    ids: list[int] = []
    times: list[float] = []
    for _ in range(steps):
        if len(allowed) == 0 or (accepting and rng.random() < 0.5):
            return times, ids, accepting
        token = int(allowed[rng.randrange(len(allowed))])
        started = time.perf_counter()
        allowed, accepting, done = lib.step(state, token)
        times.append(time.perf_counter() - started)
        ids.append(token)
        if done:
            return times, ids, True
    return times, ids, False


def tokenizers() -> dict[str, Tokenizer]:
    found = {p.name: load_tokenizer(p) for p in sorted((ROOT / "models").iterdir()) if (p / "tokenizer.json").exists()}
    text = (ROOT / "data" / "shakespeare" / "shakespeare.txt").read_text(encoding="utf-8")
    found["shakespeare word (fitted, 8192)"] = fit_tokenizer("word", text, 8192)
    found["shakespeare bpe (fitted, 4096)"] = fit_tokenizer("bpe", text, 4096)
    return found


def measure(lib_cls: type, name: str, tokenizer: Tokenizer) -> dict[str, str]:
    started = time.perf_counter()
    lib = lib_cls(tokenizer)
    row = {"setup": f"{(time.perf_counter() - started) * 1e3:.1f}"}
    for kind, spec in CONSTRAINTS.items():
        started = time.perf_counter()
        try:
            compiled = lib.compile(kind, spec)
        except Exception as e:  # refused: a vocabulary that cannot spell it (textgen's 400), or another error
            seconds = time.perf_counter() - started
            why = "cannot spell" if re.search("cannot spell|incompatible", str(e)) else str(e).splitlines()[0][:40]
            row[f"{kind} compile"] = f"{seconds * 1e3:.2f} (refused: {why})"
            row[f"{kind} mask"] = "—"
            continue
        row[f"{kind} compile"] = f"{(time.perf_counter() - started) * 1e3:.2f}"
        rng = random.Random(0)
        times = [t for _ in range(10) for t in walk(lib, compiled, rng)[0]]
        row[f"{kind} mask"] = f"{statistics.median(times) * 1e6:.1f}" if times else "no token"
    print(name, lib.name, row, flush=True)
    return row


def coverage(lib_cls: type, tokenizer: Tokenizer) -> dict[str, str]:
    import jsonschema_rs

    lib = lib_cls(tokenizer)
    out = {}
    for feature, schema in FEATURES.items():
        try:
            compiled = lib.compile("json", schema)
        except Exception:
            out[feature] = "refused"
            continue
        validator = jsonschema_rs.validator_for(schema)
        rng = random.Random(1)
        good = bad = 0
        for _ in range(12):
            _, ids, finished = walk(lib, compiled, rng)
            if not finished:
                continue
            try:
                ok = validator.is_valid(json.loads(tokenizer.decode(ids)))
            except ValueError:
                ok = False
            good, bad = good + ok, bad + (not ok)
        out[feature] = "?" if good + bad == 0 else "yes" if bad == 0 else f"ignored {bad}/{good + bad}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_summary())
    libs = libraries()
    toks = tokenizers()
    head = (
        "| tokenizer (vocab) | library | setup ms | regex compile ms | choice compile ms | 10-prop schema compile ms "
    )
    head += "| regex mask µs/token | choice mask µs/token | schema mask µs/token |"
    rows = [head, "|" + " --- |" * 9]
    for name, tok in toks.items():
        for lib in libs:
            r = measure(lib, name, tok)
            cells = [r["setup"]] + [r[f"{k} compile"] for k in CONSTRAINTS] + [r[f"{k} mask"] for k in CONSTRAINTS]
            rows.append(f"| {name} ({tok.vocab_size}) | {lib.name} | " + " | ".join(cells) + " |")
    bpe = toks["shakespeare bpe (fitted, 4096)"]
    cover = {lib.name: coverage(lib, bpe) for lib in libs}
    crow = ["| JSON-schema feature | " + " | ".join(cover) + " |", "|" + " --- |" * (len(cover) + 1)]
    crow += [f"| {f} | " + " | ".join(c[f] for c in cover.values()) + " |" for f in FEATURES]
    body = f"""
Machine: {machine_summary()}.
Command: `python bench/constraints.py` (one thread; libraries: {", ".join(lib.name for lib in libs)}).

Compile = from the constraint to its first mask; mask = the median cost of one token (consume it, compute the
next mask over the vocabulary) over 10 random walks through the grammar. "no token": the vocabulary cannot
start the constraint; "refused: cannot spell": the library found that at compile time (the time shown; textgen
answers 400).

{chr(10).join(rows)}

JSON-schema coverage on the BPE vocabulary (12 random walks each, every finished text validated):

{chr(10).join(crow)}
"""
    print(body)
    if not args.no_write:
        write_section("Constrained decoding (bench/constraints.py)", body)


if __name__ == "__main__":
    main()
