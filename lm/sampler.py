"""Sampling: from one step's logits to the next token, and from tokens to text that is safe to stream.

`SequenceSampler` holds one sequence's state (seeded generator, token counts for the penalties, the
incremental detokenizer, the stop-string look-behind). It never touches the model, so the HTTP engine
can call `choose()` / `push()` on each row of a batched logits tensor. `stream_generate()` is the
single-sequence loop built on it: the prompt in one forward call, then one token per step with the
LSTM state carried, never re-feeding the sequence (as in pytorch/examples word_language_model).

Order of the logits processors (the same as Hugging Face's and vLLM's):
additive bias -> repetition penalty -> presence/frequency penalties -> temperature -> top-k -> top-p
-> min-p -> sample. The additive bias is one (V,) row per sequence (`SequenceSampler.step_bias()`):
-inf at the tokenizer's special ids (the unknown token: it is never sampled unless
`skip_special_tokens` is false, as LLM servers keep special tokens out of the text) plus the
request's `logit_bias` (OpenAI's: token id -> bias in [-100, 100]). The reported log-probabilities
(`logprobs()`) are the model's own distribution, before any of it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lm.errors import ConfigError
from lm.tokenizers import StreamDecoder, Tokenizer

if TYPE_CHECKING:  # the constraint library loads only where a constraint is compiled
    from lm.constrain import CompiledConstraint

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 8
FINISH_LENGTH = "length"
FINISH_STOP = "stop"
# Logits are clamped to +-this after a division by a repetition penalty: a tiny penalty (1e-300
# passes validation) would make them +-inf, and softmax NaN. (The temperature divides logits less
# their maximum instead, which are <= 0: a tiny temperature then leaves only the top token.)
LOGIT_LIMIT = 1e30
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's bound: -100 bans a token in practice, +100 forces it
MIN_LOGPROB = -9999.0  # the floor of a reported log-probability (OpenAI's value for "impossible")
GREEDY_BELOW = 1e-30  # a temperature below this is greedy: it could round to 0 in float32 (0 / 0 = NaN)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019); 1 = off
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token); 0 = off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019) over prompt + completion; 1 = off
    presence_penalty: float = 0.0  # OpenAI semantics, over completion tokens
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # (token id, bias) pairs added to the logits before everything else (OpenAI's logit_bias); a dict is taken too
    logit_bias: tuple[tuple[int, float], ...] = ()
    skip_special_tokens: bool = True  # never sample the tokenizer's special ids (the unknown token, U+FFFD)

    def __post_init__(self) -> None:
        # accept a list (JSON bodies, argparse) or a dict (logit_bias) but keep the frozen value hashable
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        elif not isinstance(self.logit_bias, tuple):
            object.__setattr__(self, "logit_bias", tuple(tuple(pair) for pair in self.logit_bias))

    def validate(self) -> None:
        """Raise ConfigError naming the first parameter that is out of bounds."""
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_float("temperature", self.temperature, 0.0, 5.0)
        _check_int("top_k", self.top_k, 0, None)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0, hi_open=True)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ConfigError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("every stop string must be a non-empty string", "stop")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or null, got {self.seed!r}", "seed")
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        """Ids are checked against a vocabulary where there is one (`bias_row`); here, their form and the biases."""
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ConfigError(
                f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}", "logit_bias"
            )
        for token_id, bias in self.logit_bias:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ConfigError(f"logit_bias: a token id is an integer >= 0, got {token_id!r}", "logit_bias")
            ok = not isinstance(bias, bool) and isinstance(bias, int | float) and math.isfinite(bias)
            if not ok or abs(bias) > LOGIT_BIAS_LIMIT:
                message = f"logit_bias: the bias of token {token_id} must be in [-100, 100], got {bias!r}"
                raise ConfigError(message, "logit_bias")


def _check_int(name: str, value: object, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}", name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bound}, got {value}", name)


def _check_float(
    name: str, value: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}", name)
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {value:g}", name)


@functools.lru_cache(maxsize=16)  # a few tokenizers at a time (one per loaded model version); small rows
def special_mask(tokenizer: Tokenizer) -> Tensor | None:
    """(V,) float32: -inf at the tokenizer's special ids, 0 elsewhere; None when there is nothing to mask
    (or it would mask every token). Built once per tokenizer and shared by its sequences: never write to it."""
    vocab = tokenizer.vocab_size
    ids = sorted({i for i in tokenizer.special_ids if 0 <= i < vocab})
    if not ids or len(ids) >= vocab:
        return None
    mask = torch.zeros(vocab)
    mask[ids] = float("-inf")
    return mask


def bias_row(tokenizer: Tokenizer, params: SamplingParams) -> Tensor | None:
    """The (V,) float32 row a sequence adds to every step's logits: the special-token mask (unless
    `skip_special_tokens` is off) plus `logit_bias`; None when there is neither, so such a row costs
    nothing. ConfigError naming logit_bias for an id outside the vocabulary."""
    mask = special_mask(tokenizer) if params.skip_special_tokens else None
    if not params.logit_bias:
        return mask  # the shared row: a batch of default requests adds it with one broadcast
    vocab = tokenizer.vocab_size
    for token_id, _ in params.logit_bias:
        if token_id >= vocab:
            message = f"logit_bias: token id {token_id} is outside the vocabulary (ids 0 to {vocab - 1})"
            raise ConfigError(message, "logit_bias")
    row = torch.zeros(vocab) if mask is None else mask.clone()
    ids = torch.tensor([token_id for token_id, _ in params.logit_bias], dtype=torch.long)
    row[ids] += torch.tensor([bias for _, bias in params.logit_bias], dtype=torch.float32)  # ids are distinct
    return row


class SequenceSampler:
    """One sequence's sampling and detokenizing state.

    Call `choose(logits)` for the next id, then `push(id)` for the text that is safe to emit, until
    `finished`; then `flush()` for what was held back. Nothing here depends on the model.

    `step_bias()` is the one place a sequence changes its logits additively (before penalties and
    temperature): the batched sampler asks every row for it and adds them all at once. A bias that
    depends on the tokens chosen so far (a constraint's mask) sets `bias_varies`, so that the engine
    samples that row one step at a time instead of several steps in one native call.
    """

    bias_varies = False  # True when step_bias() may change after a push()

    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams,
        prompt_ids: list[int],
        constraint: CompiledConstraint | None = None,
    ) -> None:
        params.validate()
        self.tokenizer = tokenizer
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        vocab = tokenizer.vocab_size
        self._counts = torch.zeros(vocab)  # (V,) completion-token counts: presence/frequency penalties
        self._seen = torch.zeros(vocab, dtype=torch.bool)  # (V,) prompt + completion: repetition penalty
        self._seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self._penalized = params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)
        self._decoder = StreamDecoder(tokenizer)
        self._held = ""  # decoded text not yet emitted: it may be the start of a stop string
        self.bias = bias_row(tokenizer, params)  # (V,) or None: the same every step
        # the text must match this (lm/constrain.py): its mask joins the bias, and changes every step
        self.constraint = constraint.start() if constraint is not None else None
        self.bias_varies = self.constraint is not None
        self.refused: int | None = None  # a sampled token the constraint took as the end: not in the text
        self.advanced_by: int | None = None  # the token the constraint was already advanced by (`advance_constraints`)

    def step_bias(self) -> Tensor | None:
        """The (V,) float32 row to add to this step's logits, or None: `bias` (the special-token mask and
        logit_bias), plus the constraint's mask where there is one. Never written to by the caller; it may
        be shared with other sequences."""
        mask = self.constraint.row if self.constraint is not None else None
        if mask is None:
            return self.bias
        return mask if self.bias is None else self.bias + mask

    # -- choosing -------------------------------------------------------------------------------

    def choose(self, logits: Tensor, *, biased: bool = False) -> int:
        """logits (V,) -> the next token id. Sampling runs on CPU in float32, so a seed gives the same
        draw whatever device produced the logits. `biased`: `step_bias()` is already added (the batched
        sampler adds the whole batch's rows at once)."""
        x = logits.detach().to("cpu", torch.float32)  # (V,)
        if x.shape != self._counts.shape:
            raise ValueError(f"expected logits of shape ({self._counts.numel()},), got {tuple(x.shape)}")
        bias = None if biased else self.step_bias()
        if bias is not None:
            x = x + bias  # -inf at a masked id stays -inf through every processor below
        x = self._penalize(x)
        p = self.params
        if p.temperature < GREEDY_BELOW:
            return int(x.argmax())
        x = (x - x.max()) / p.temperature  # softmax is shift-invariant; no +inf for any temperature > 0
        if p.top_k:
            x = _top_k(x, p.top_k)
        if p.top_p < 1.0:
            x = _top_p(x, p.top_p)
        if p.min_p > 0.0:
            x = _min_p(x, p.min_p)
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _penalize(self, x: Tensor) -> Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            # CTRL: shrink a seen token's logit towards "less likely" whatever its sign
            penalized = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            penalized = penalized.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
            x = torch.where(self._seen, penalized, x)
        if p.presence_penalty or p.frequency_penalty:
            # OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty
            x = x - self._counts * p.frequency_penalty - (self._counts > 0).float() * p.presence_penalty
        return x

    def logprobs(self, logits: Tensor, token_id: int, top: int) -> tuple[float, dict[str, float]]:
        """Log-probability of `token_id` and of the `top` most likely tokens, as {piece: logprob}.

        The distribution is the model's softmax at the request's temperature (temperature 1 when greedy),
        before logit_bias, the special-token mask, penalties and top-k/top-p/min-p truncation, so it does
        not depend on the sequence's state (and a masked token keeps its probability, as scoring needs).
        """
        temperature = self.params.temperature if self.params.temperature >= GREEDY_BELOW else 1.0
        x = logits.detach().to("cpu", torch.float32)  # (V,)
        # less the maximum (no +inf), and floored: a tiny temperature gives -inf, which JSON cannot carry
        lp = torch.log_softmax((x - x.max()) / temperature, dim=-1).clamp(min=MIN_LOGPROB)  # (V,)
        values, ids = lp.topk(min(top, lp.numel())) if top > 0 else (lp[:0], lp[:0].long())
        pieces: dict[str, float] = {}
        for value, tid in zip(values.tolist(), ids.tolist(), strict=True):
            pieces.setdefault(self._piece(tid), value)  # two ids may share a piece: keep the likelier
        return float(lp[token_id]), pieces

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    # -- emitting -------------------------------------------------------------------------------

    def push(self, token_id: int) -> str:
        """Record the chosen token; return the text that is safe to emit now.

        Text that could still become a stop string is held back. When a stop string completes, the
        sequence finishes with "stop" and neither the stop string nor anything after it is returned.
        After max_tokens the sequence finishes with "length"; `flush()` then returns the held-back text.
        A push after the sequence finished is ignored.
        """
        if self.finished:
            return ""
        if self.constraint is not None and not self._constrain(token_id):
            return ""
        self.completion_tokens += 1
        if self._penalized:  # two tensor writes per token: only when a penalty reads them
            self._counts[token_id] += 1
            self._seen[token_id] = True
        out = self._release(self._decoder.push(token_id))
        if not self.finished and self.constraint is not None and (self.constraint.complete or self.constraint.dead_end):
            # complete: the grammar allows nothing more; a dead end: no token of the vocabulary continues
            # it, and the valid prefix ends here as at max_tokens
            self._finish(FINISH_STOP if self.constraint.complete else FINISH_LENGTH)
        if not self.finished and self.completion_tokens >= self.params.max_tokens:
            self._finish(FINISH_LENGTH)
        return out

    def _constrain(self, token_id: int) -> bool:
        """Advance the constraint by a sampled token; False when the token is not part of the text: the
        grammar accepts the text so far and the model chose to leave it (nothing was masked: see
        lm/constrain.py), or it was complete before any token. The sequence then ends with "stop"."""
        assert self.constraint is not None
        if self.advanced_by is not None:  # lm/batch_sampler.py advanced the batch's constraints together
            advanced, self.advanced_by = self.advanced_by == token_id, None
            if advanced:
                return True
        if self.constraint.allows(token_id):
            self.constraint.advance(token_id)
            return True
        self.refused = token_id
        self._finish(FINISH_STOP if self.constraint.accepting else FINISH_LENGTH)
        return False

    def flush(self) -> str:
        """The text held back so far (and any partial UTF-8 at the end), cut at a stop string.
        Nothing after a "stop" finish; empty on a second call."""
        if self.finish_reason == FINISH_STOP:
            return ""
        text = self._held + self._decoder.flush()
        self._held = ""
        cut = self._find_stop(text)
        if cut is not None:
            self._finish(FINISH_STOP)
            return text[:cut]
        return text

    def _release(self, text: str) -> str:
        if not self.params.stop:
            return text
        buf = self._held + text
        cut = self._find_stop(buf)
        if cut is not None:
            self._held = ""
            self._finish(FINISH_STOP)
            return buf[:cut]
        keep = self._stop_prefix_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def _find_stop(self, text: str) -> int | None:
        """Index of the earliest stop string in text, or None."""
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _top_k(x: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of x (V,); -inf elsewhere."""
    if k >= x.numel():
        return x
    kth = torch.topk(x, k).values[-1]
    return x.masked_fill(x < kth, float("-inf"))


def _top_p(x: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= top_p (at least one)."""
    sorted_x, order = torch.sort(x, descending=True)  # (V,)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= top_p
    drop_sorted[0] = False  # the most likely token stays, even for a top_p that rounds to 0 in float32
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def _min_p(x: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's (Nguyen et al. 2024)."""
    probs = torch.softmax(x, dim=-1)
    return x.masked_fill(probs < min_p * probs.max(), float("-inf"))


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids to feed for a prompt; an empty prompt starts from the encoding of "\\n"."""
    ids = tokenizer.encode(prompt) if prompt else []
    return ids or tokenizer.encode("\n") or [tokenizer.unk_id]


@torch.inference_mode()
def _forward(model: nn.Module, ids: list[int], state: tuple[Tensor, Tensor] | None, device: torch.device):
    """ids (T,) -> logits of the last position (V,) and the carried state."""
    logits, state = model(torch.tensor([ids], dtype=torch.long, device=device), state)  # (1, T, V)
    return logits[0, -1], state


class TextStream:
    """The pieces of one generation, as an iterator. After it is exhausted, `finish_reason`
    ("length" | "stop") and `usage` ({prompt_tokens, completion_tokens, total_tokens}) are set;
    `usage` counts the fed prompt tokens (1 for an empty prompt, the start token)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> None:
        params.validate()
        self.prompt_ids = prompt_ids(tokenizer, prompt)
        self.sampler = SequenceSampler(tokenizer, params, self.prompt_ids)
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self._pieces = self._run(model)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self, model: nn.Module) -> Iterator[str]:
        sampler = self.sampler
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # dropout off: a seed must give the same text
        try:
            logits, state = _forward(model, self.prompt_ids, None, device)  # the whole prompt, once
            while True:
                token = sampler.choose(logits)
                text = sampler.push(token)
                if text:
                    yield text
                if sampler.finished:
                    break
                logits, state = _forward(model, [token], state, device)  # one token, state carried
            rest = sampler.flush()
            if rest:
                yield rest
            self.finish_reason = sampler.finish_reason
            self.usage = sampler.usage
            log.debug("generation finished: %s, %s", self.finish_reason, self.usage)
        finally:
            model.train(was_training)


def stream_generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> TextStream:
    """Generate text for `prompt`, piece by piece. Raises ConfigError for out-of-bounds params."""
    return TextStream(model, tokenizer, prompt, params)


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The whole completion as one string (the stop string, if any, excluded)."""
    return "".join(stream_generate(model, tokenizer, prompt, params))
