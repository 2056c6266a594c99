"""Prompt scoring: the log-probability of every prompt token, for `echo` + `logprobs` on /v1/completions
and `prompt_logprobs` on /generate.

The engines decode with their own steps (int8, fused) and prefill without the output layer at every
position, so scores come from the checkpoint's fp32 forward instead: the one `textgen eval` runs
(lm/train/evaluate.py `score_ids`). A text's mean negative log-likelihood from the API is therefore
eval's loss on it. A request's prompts run as one batch in a worker thread, while the request holds
one admission slot (429 when the server or the client is full); their length is bounded by
TEXTGEN_MAX_PROMPT_CHARS like any prompt's.

Each prompt starts from the zero state with no start token, as each stream of `textgen eval` does:
its first token has no prediction, so its log-probability is null, as in OpenAI's API. The
distribution is the model's own softmax (temperature 1), whatever the request's sampling fields.
"""

from __future__ import annotations

import asyncio
import codecs
from dataclasses import dataclass

from fastapi import Request

from app.engine import Admission
from app.generation import admitted
from app.holder import Lease
from app.settings import Settings
from lm.sampler import MIN_LOGPROB
from lm.tokenizers import Tokenizer
from lm.train import score_ids


@dataclass
class PromptScores:
    """One prompt's tokens: their ids, text, character offsets, log-probabilities and top alternatives.
    `logprobs[0]` and `top[0]` are None: nothing predicts the first token."""

    ids: list[int]
    pieces: list[str]
    offsets: list[int]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


async def score_prompts(
    request: Request, lease: Lease, admission: Admission, settings: Settings, prompts: list[list[int]], top: int
) -> list[PromptScores]:
    """Score `prompts` (token ids, checked) on the leased model in a worker thread, holding one admission slot."""
    async with admitted(request, admission, lease.holder.metrics, settings):
        return await asyncio.to_thread(_score, lease, prompts, top)


def _score(lease: Lease, prompts: list[list[int]], top: int) -> list[PromptScores]:
    checkpoint = lease.loaded.checkpoint
    tokenizer = checkpoint.tokenizer
    results = []
    for ids, (chosen, values, top_ids) in zip(prompts, score_ids(checkpoint.model, prompts, top), strict=True):
        alternatives: list[dict[str, float] | None] = [None]
        for row_values, row_ids in zip(values.tolist(), top_ids.tolist(), strict=True):
            pieces: dict[str, float] = {}
            for value, tid in zip(row_values, row_ids, strict=True):
                pieces.setdefault(piece(tokenizer, tid), max(value, MIN_LOGPROB))  # two ids may share a piece
            alternatives.append(pieces)
        logprobs: list[float | None] = [None, *(max(v, MIN_LOGPROB) for v in chosen.tolist())]
        results.append(
            PromptScores(
                ids=ids,
                pieces=[piece(tokenizer, t) for t in ids],
                offsets=text_offsets(tokenizer, ids),
                logprobs=logprobs[: len(ids)],
                top=alternatives[: len(ids)],
            )
        )
    return results


def piece(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text; a byte-level piece that is part of a character decodes to U+FFFD."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def text_offsets(tokenizer: Tokenizer, ids: list[int], start: int = 0) -> list[int]:
    """Where each token starts in the decoded text, in characters; a token that starts inside a character
    (a byte-level piece) starts where that character does."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, at = [], start
    for token_id in ids:
        offsets.append(at)
        at += len(decoder.decode(tokenizer.token_bytes(token_id)))
    return offsets
