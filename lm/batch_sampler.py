"""Sampling a whole decode batch at once, with the same draws as `SequenceSampler.choose` row by row.

At 64 streams, `SequenceSampler.choose` per row costs more than the decode step itself (about ten
small tensor ops per row). `choose_batch` runs the common processors over the (B, V) logits with
per-row parameters: first each row's additive bias (`batch_bias`: the special-token mask and
logit_bias, one broadcast add when every row shares the tokenizer's mask, nothing when no row has
one), then temperature, top-k, top-p and min-p, then one categorical draw per row from
that row's own seeded generator. A row with repetition/presence/frequency penalties is handed to
its sampler's own `choose()` (those depend on the sequence's token counts).

Why the ids are the same as `SequenceSampler.choose`:
- each processor is the same elementwise arithmetic on the same float32 values, with the
  parameter cast to float32 exactly as a Python scalar is;
- a mask is applied only to the rows that turn the processor on (top_p = 1 applied anyway could
  drop tail tokens whose cumulative mass rounds to 1);
- `torch.multinomial(probs, 1, generator=g)` on CPU draws q ~ Exp(1) of shape (V,) from g and
  returns argmax(probs / q) (the exponential-race form of the Gumbel-max trick); here each row
  draws its own q from its own generator in the same way, then one batched argmax (in one native
  call when lm/kernels/native.py's module is built: the same ATen draws, without a Python loop over rows;
  and there, the processors before the draw too, the same ATen ops in the same order from C++).
One documented difference: top-p sorts all rows at once, and two tokens with exactly equal logits
may be ranked in the other order than a one-row sort ranks them; the kept set can then differ when
the top-p threshold falls between the two. tests/lm/test_batch_sampler.py checks equality on many
random batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lm.kernels import native
from lm.sampler import GREEDY_BELOW, SequenceSampler


def choose_batch(samplers: Sequence[SequenceSampler], logits: Tensor, *, native_draws: bool = True) -> list[int]:
    """logits (B, V) -> the next token id of each row, as `samplers[i].choose(logits[i])` would give.

    `native_draws`: the rows' random draws in one native call when lm/kernels/native.py's module is built."""
    x = logits.detach().to("cpu", torch.float32)  # (B, V)
    bias = batch_bias(samplers)
    if bias is not None:
        x = x + bias  # a new tensor: the caller's logits stay the model's (logprobs, the prompt cache)
    ids: list[int] = [0] * len(samplers)
    greedy: list[int] = []
    sampled: list[int] = []
    for i, sampler in enumerate(samplers):
        p = sampler.params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            ids[i] = sampler.choose(x[i], biased=True)  # penalties need the sequence's counts: the per-row path
        elif p.temperature < GREEDY_BELOW:
            greedy.append(i)
        else:
            sampled.append(i)
    if greedy:
        rows = x if len(greedy) == len(samplers) else x[greedy]
        for i, token in zip(greedy, rows.argmax(dim=1).tolist(), strict=True):
            ids[i] = token
    if sampled:
        rows = x if len(sampled) == len(samplers) else x[sampled]
        picks = _sample_rows([samplers[i] for i in sampled], rows, native_draws)
        for i, token in zip(sampled, picks, strict=True):
            ids[i] = token
    return ids


def advance_constraints(samplers: Sequence[SequenceSampler], token_ids: Sequence[int]) -> None:
    """Before a batch's tokens are pushed: advance every constrained row's constraint by its token at once,
    the next masks computed in one call (lm/constrain.py `advance_all`) rather than one per row; each
    sampler's `push()` then finds its constraint moved. Nothing to do with fewer than two such rows."""
    rows = [(s, t) for s, t in zip(samplers, token_ids, strict=True) if s.constraint is not None and not s.finished]
    if len(rows) < 2:
        return
    from lm.constrain import advance_all  # the constraint library loads only where a constraint exists

    moved = advance_all([s.constraint for s, _ in rows if s.constraint is not None], [t for _, t in rows])
    for (sampler, token_id), advanced in zip(rows, moved, strict=True):
        if advanced:
            sampler.advanced_by = token_id


def batch_bias(samplers: Sequence[SequenceSampler]) -> Tensor | None:
    """What to add to the batch's (B, V) logits: None when no row has a bias; the shared (V,) row when
    every row has the same one (the tokenizer's special-token mask: one broadcast add); else (B, V),
    zeros for the rows without. Each row's `step_bias()` is asked once per step, here."""
    rows = [s.step_bias() for s in samplers]
    present = [row for row in rows if row is not None]
    if not present:
        return None
    first = present[0]
    if len(present) == len(rows) and all(row is first for row in present):
        return first
    zeros = torch.zeros_like(first)
    return torch.stack([zeros if row is None else row for row in rows])  # (B, V)


def _column(values: list[float]) -> Tensor | float:
    """Per-row values as a (B, 1) float32 column, or one Python float when all rows agree (the common
    case: it skips a tensor construction, and is exactly the scalar `SequenceSampler` uses)."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=torch.float32)[:, None]  # (B, 1)


def _sample_rows(samplers: list[SequenceSampler], x: Tensor, native_draws: bool) -> list[int]:
    """x (B, V) float32 -> one draw per row through temperature, top-k, top-p, min-p. In one native
    call when the module is built (the same ATen ops in the same order, so the same ids)."""
    params = [s.params for s in samplers]
    module = native.load() if native_draws else None
    if module is not None:
        return module.sample_rows(
            x.contiguous(),
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [s.generator for s in samplers],
        ).tolist()
    # softmax is shift-invariant; less the row's maximum, no +inf for any temperature > 0 (as SequenceSampler)
    x = (x - x.amax(dim=1, keepdim=True)) / _column([p.temperature for p in params])
    if any(p.top_k for p in params):
        x = _top_k(x, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        x = _top_p(x, [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in params):
        x = _min_p(x, [p.min_p for p in params])
    probs = torch.softmax(x, dim=-1)  # (B, V)
    return draw_rows(probs, [s.generator for s in samplers], native_draws).tolist()


def draw_rows(probs: Tensor, generators: list[torch.Generator], native_draws: bool = True) -> Tensor:
    """probs (B, V) -> (B,) ids: each row's exponential race from its own generator (the draw
    torch.multinomial makes from it), then one argmax of probs / race. In one native call, with the
    GIL released, when lm/kernels/native.py's module is built (the same ATen draws, so the same ids)."""
    module = native.load() if native_draws else None
    if module is not None:
        return module.draw_rows(probs, generators)
    race = torch.empty_like(probs)
    for row, generator in zip(race, generators, strict=True):
        row.exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=1)


def _top_k(x: Tensor, ks: list[int]) -> Tensor:
    """Per row: keep the k largest logits (k = 0 or k >= V: keep all)."""
    V = x.shape[1]
    k = ks[0]
    if all(other == k for other in ks):  # one k for the whole batch: no sort, no masks to build
        if not 0 < k < V:
            return x
        kth = x.topk(k, dim=1).values[:, -1:]  # (B, 1)
        return x.masked_fill(x < kth, float("-inf"))
    on = torch.tensor([0 < k < V for k in ks])[:, None]  # (B, 1)
    index = torch.tensor([min(max(k, 1), V) - 1 for k in ks])[:, None]  # (B, 1)
    kth = x.sort(dim=1, descending=True).values.gather(1, index)  # (B, 1): the k-th largest value
    return x.masked_fill(on & (x < kth), float("-inf"))


def _top_p(x: Tensor, top_ps: list[float]) -> Tensor:
    """Per row: the smallest set of most likely tokens with mass >= top_p (top_p = 1: keep all)."""
    sorted_x, order = torch.sort(x, dim=1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_x, dim=1)
    mass_before = torch.cumsum(probs, dim=1) - probs
    drop_sorted = mass_before >= _column(top_ps)
    drop_sorted[:, 0] = False  # the most likely token stays, even for a top_p that rounds to 0 in float32
    if not all(p < 1.0 for p in top_ps):  # only the rows that turn top-p on
        drop_sorted &= torch.tensor([p < 1.0 for p in top_ps])[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def _min_p(x: Tensor, min_ps: list[float]) -> Tensor:
    """Per row: drop tokens below min_p times the top token's probability (min_p = 0: keep all)."""
    probs = torch.softmax(x, dim=1)
    threshold = _column(min_ps) * probs.amax(dim=1, keepdim=True)  # (B, 1)
    return x.masked_fill(probs < threshold, float("-inf"))
