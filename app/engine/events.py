"""What flows between a request and the engine: a `Sequence` in, its `Event`s out.

A `Sequence` is created on the event loop and advanced by the engine's thread; the engine talks
back only through the loop's `call_soon_threadsafe`, which puts (index, event) on the request's
asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lm.sampler import SequenceSampler

State = tuple[Tensor, Tensor]  # (h, c), each (layers, B, H)


@dataclass
class Token:
    """Generated text: one token, or with stream coalescing the text of several consecutive tokens.

    `text` is "" while a stop string or UTF-8 character is pending. Sequences that ask for logprobs
    always get one event per token.
    """

    text: str
    token_id: int | None  # the (last) token; None: the held-back text released at a "length" finish
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None


@dataclass
class Finished:
    finish_reason: str  # "length" | "stop"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens


@dataclass
class Failed:
    message: str
    retryable: bool = True


Event = Token | Finished | Failed


# ---------------------------------------------------------------------------- sequences


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. Created on the event loop, advanced by the engine thread.

    The engine talks back only through its loop's `call_soon_threadsafe`, which puts (index, event)
    on the request's asyncio.Queue (shared by the sequences of one request); the request cancels
    it by setting `cancelled`, which the engine reads before every step.
    """

    prompt_ids: list[int]
    sampler: SequenceSampler
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, Event]]
    index: int = 0  # position in its request (choice index)
    logprobs: int | None = None  # how many top alternatives to report per token; None = no logprobs
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancelled: bool = False
    done: bool = False  # the engine queued Finished or Failed for it, or dropped it
    # engine-side bookkeeping
    slot: int | None = None  # its row in StateSlots while running
    last_token: int = 0
    generated: list[int] = field(default_factory=list)  # completion ids fed back so far
    submitted_at: float = 0.0
    last_token_at: float | None = None
    started: bool = False  # its prefill has begun (the cache was looked up)
    prefilled: int = 0  # prompt tokens whose state is known (cached or run)
    prefill_state: State | None = None  # (layers, 1, H) x2 after `prefilled` tokens
    prefill_logits: Tensor | None = None  # (V,) at position prefilled - 1
    pending: str = ""  # coalesced text not yet delivered
    pending_id: int | None = None
    flushed_at: float | None = None  # when text was last delivered; None = nothing delivered yet
    series: Any = None  # app.metrics.VersionSeries: its version's (and alias's) latency series, if any

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, event: Event) -> None:
        """From the engine thread: hand one event to the request's queue on its event loop."""
        if isinstance(event, Finished | Failed):
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled = True


def deliver_all(items: list[tuple[Sequence, Event]]) -> None:
    """On the event loop: one turn's events, in order."""
    for seq, event in items:
        seq.queue.put_nowait((seq.index, event))
