"""The sizes of the default recipe, fitted to the corpus and the time budget.

With no sizes given, `train()` asks `fit_recipe` for the width, depth, dropout and vocabulary cap, and
applies its answer to the fields the user left unset (`TrainConfig.fitted`); what it chose, and why, goes into
the metrics (`recipe_choice`) and `textgen train`'s summary. docs/TRAINING.md, "The default recipe",
has the measurements behind each rule.

The rules, each from one number:

- width from the corpus: about 3 parameters per character of text, the ratio of the recipe tuned
  on tiny-shakespeare (512 units for 1.1 MB, 3.4 M parameters): hidden = 512 * sqrt(chars / 1 MB),
  in steps of 64, between 128 and 512. A 50 KB corpus gets 128 units (0.2 M parameters), not a
  3.4 M-parameter model that learns it by heart in a minute;
- width from the budget: a short budget gets a narrower model, so that the run makes at least
  MIN_PASSES passes over the corpus (estimated from REFERENCE_TOKENS_PER_S, the recipe's measured
  rate on 2 cores, and the product count per token): a model that sees its text once has not
  learned what a smaller one would have in the same minutes;
- dropout from the passes the run will make at that width: 0.2 (the recipe's) up to 10 passes,
  0.3 up to 50, 0.4 beyond (a small corpus under a long budget);
- the embedding: a quarter of the width for a small alphabet (char tokens of a Latin script); the
  full width, with the output layer tied to it (Press & Wolf 2017), for a large vocabulary (word and
  BPE tokens, or the characters of Chinese), where the embedding is most of the model;
- the vocabulary cap: word tokens keep the most frequent chars/128 words (a power of two, 1,024 to
  16,384) instead of every word; BPE merges to 1,024 tokens (512 under 128 KB of text); characters
  keep every symbol up to 4,096 (the rarest beyond become <unk>).
"""

from __future__ import annotations

import math
from typing import Any

from lm.tokenizers import DEFAULT_BPE_VOCAB, MIN_BPE_VOCAB

REFERENCE_CHARS = 1_000_000  # the corpus size the 512-unit recipe was tuned on (tiny-shakespeare, 1.1 MB)
REFERENCE_HIDDEN = 512
MIN_HIDDEN, WIDTH_STEP = 128, 64
# tokens/s of the 512-unit, 2-layer char recipe on 2 cores (docs/TRAINING.md, "The training kernel": 15,061)
REFERENCE_TOKENS_PER_S = 15_000.0
MIN_PASSES = 2.0  # a budget too short for this many passes at the corpus's width gets a narrower model
LARGE_VOCAB = 256  # above this many symbols the embedding takes the full width and is tied to the output
CHAR_VOCAB_CAP = 4096
CHARS_PER_TOKEN = {"char": 1.0, "word": 4.0, "bpe": 3.0}  # roughly, for English text
SIZE_FIELDS = ("vocab_size", "embedding_dim", "hidden_dim", "layers", "dropout", "tie_weights")


def fit_recipe(
    corpus_chars: int, symbols: int, tokenizer: str, time_budget_s: float | None, given: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """The sizes for a corpus of `corpus_chars` characters with `symbols` distinct tokenizer symbols (words
    for `word`, characters otherwise) under `time_budget_s` (None: the default epochs), and the reason.

    `given` holds the sizes the user set: they are kept, and the others follow them (an embedding
    fitted to a given width). Returns every field of SIZE_FIELDS."""
    given = given or {}
    chars = max(1, corpus_chars)
    vocab = given.get("vocab_size") or _vocab_cap(tokenizer, chars, symbols)
    planned_vocab = vocab if vocab is not None else symbols + 1
    large_vocab = tokenizer != "char" or planned_vocab > LARGE_VOCAB
    data_width = _round_width(REFERENCE_HIDDEN * math.sqrt(chars / REFERENCE_CHARS))
    why = [f"{_size(chars)}, {symbols:,} {'words' if tokenizer == 'word' else 'symbols'}"]
    width = data_width
    if time_budget_s is not None:
        while (
            width > MIN_HIDDEN
            and _passes(width, planned_vocab, large_vocab, tokenizer, chars, time_budget_s) < MIN_PASSES
        ):
            width -= WIDTH_STEP
        if width < data_width:
            why.append(f"{time_budget_s:g} s allow {MIN_PASSES:g} passes at {width} units, not at {data_width}")
    hidden = given.get("hidden_dim") or width
    why.insert(1, f"{data_width} units fit the text (about 3 parameters per character)")
    tie = given.get("tie_weights")
    if tie is None:
        tie = large_vocab and given.get("embedding_dim") in (None, hidden)
    emb = given.get("embedding_dim") or (hidden if tie or large_vocab else max(32, hidden // 4))
    if time_budget_s is not None:
        passes = _passes(hidden, planned_vocab, large_vocab, tokenizer, chars, time_budget_s)
    else:
        passes = 10.0  # the default epochs
    dropout = 0.2 if passes <= 10 else 0.3 if passes <= 50 else 0.4
    why.append(f"about {passes:.0f} passes over it: dropout {dropout:g}")
    if large_vocab:
        why.append(f"{'word' if tokenizer == 'word' else tokenizer} vocabulary {planned_vocab:,}: embedding tied")
    sizes = {
        "vocab_size": vocab,
        "embedding_dim": emb,
        "hidden_dim": hidden,
        "layers": given.get("layers") or 2,
        "dropout": dropout if given.get("dropout") is None else given["dropout"],
        "tie_weights": bool(tie),
    }
    return sizes, "; ".join(why)


def _vocab_cap(tokenizer: str, chars: int, symbols: int) -> int | None:
    if tokenizer == "word":
        cap = 1 << int(math.log2(max(1, chars // 128)))
        return min(max(cap, 1024), 16_384)
    if tokenizer == "bpe":
        return DEFAULT_BPE_VOCAB if chars >= 128 * 1024 else max(MIN_BPE_VOCAB, DEFAULT_BPE_VOCAB // 2)
    return CHAR_VOCAB_CAP if symbols + 1 > CHAR_VOCAB_CAP else None


def _passes(hidden: int, vocab: int, large_vocab: bool, tokenizer: str, chars: int, budget_s: float) -> float:
    """Passes over the corpus a run of `budget_s` makes at this width: its rate scaled from the reference
    by the multiply-adds per token (the LSTM's, 2 layers, and the output layer's), at most 4x faster."""
    emb = hidden if large_vocab else hidden // 4

    def macs(h: int, e: int, v: int) -> float:
        return 4 * h * (e + h) + 4 * h * 2 * h + h * v

    speedup = min(4.0, macs(REFERENCE_HIDDEN, REFERENCE_HIDDEN // 4, 66) / macs(hidden, emb, vocab))
    return budget_s * REFERENCE_TOKENS_PER_S * speedup * CHARS_PER_TOKEN.get(tokenizer, 1.0) / chars


def _round_width(width: float) -> int:
    return int(min(REFERENCE_HIDDEN, max(MIN_HIDDEN, round(width / WIDTH_STEP) * WIDTH_STEP)))


def _size(chars: int) -> str:
    return f"{chars / 1e6:.1f}M characters" if chars >= 1e6 else f"{chars / 1e3:.0f}K characters"
