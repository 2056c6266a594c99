"""The generation engine: continuous batching of LSTM decode steps in one thread per model version.

A request becomes a `Sequence` and is submitted to the engine of the model version it pinned.
The engine's thread loops:

    admit   move waiting sequences into free state slots; prefill each new prompt in one
            forward call (its state goes into the slot, its last logits give the first token)
    step    ONE batched forward for every running sequence: last tokens (B, 1) + their
            states (layers, B, H) -> logits (B, V); then each row is sampled on its own
            `SequenceSampler`, and the text goes to the request's asyncio.Queue
    drop    finished and cancelled rows leave; their slots are free for the next admit

A sequence joins at the next step and leaves as soon as it finishes, is cancelled or its client
goes away: an LSTM's state is a fixed (layers, H) pair per sequence, so there is no KV cache to
grow or page. When nothing runs the thread blocks on its inbox (no busy loop).

Extension points for the speed work: `_step(batch)` is the only place that runs the decode
forward (a fused or quantized step replaces it), `_prefill(seq)` the only place that runs a
prompt (a prompt-state cache wraps it), and `StateSlots` owns the state storage.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.metrics import Metrics, now
from lm.model import LSTMLanguageModel
from lm.sampler import SequenceSampler
from lm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

State = tuple[Tensor, Tensor]  # (h, c), each (layers, B, H)


# ---------------------------------------------------------------------------- events


@dataclass
class Token:
    """One generated token and the text it releases ("" while a stop string or UTF-8 char is pending)."""

    text: str
    token_id: int | None  # None: the held-back text released at a "length" finish
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

    The engine talks back only through `deliver()` (thread-safe), which puts (index, event) on
    the request's asyncio.Queue (shared by the sequences of one request); the request cancels
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
    done: bool = False  # the engine delivered Finished or Failed, or dropped it
    # engine-side bookkeeping
    slot: int | None = None
    last_token: int = 0
    submitted_at: float = 0.0
    last_token_at: float | None = None

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


# ---------------------------------------------------------------------------- admission


class Overloaded(Exception):
    """More sequences than max_running + max_waiting: the request is answered 429."""


class Admission:
    """The process-wide bound on admitted sequences (running + waiting), checked before a request starts.

    Only the event loop calls it, so a plain counter is enough.
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.capacity = max_running + max_waiting
        self.admitted = 0

    def acquire(self, n: int) -> None:
        if self.admitted + n > self.capacity:
            raise Overloaded(f"{self.admitted} sequences are running or waiting (limit {self.capacity})")
        self.admitted += n

    def release(self, n: int) -> None:
        self.admitted = max(0, self.admitted - n)


# ---------------------------------------------------------------------------- state storage


class StateSlots:
    """The LSTM state of every running sequence, in preallocated slot tensors.

    h and c are each (layers, slots, H); a sequence owns one slot from its prefill to its end.
    A decode step gathers the slots of its batch, and scatters the new state back.
    """

    def __init__(self, layers: int, hidden: int, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        self.h = torch.zeros(layers, slots, hidden, device=device, dtype=dtype)
        self.c = torch.zeros(layers, slots, hidden, device=device, dtype=dtype)
        self.device = device
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def write(self, slot: int, state: State) -> None:
        """state: (h, c) of one sequence, each (layers, 1, H)."""
        self.h[:, slot] = state[0][:, 0]
        self.c[:, slot] = state[1][:, 0]

    def gather(self, slots: Tensor) -> State:
        """slots (B,) -> (h, c) each (layers, B, H), contiguous copies."""
        return self.h.index_select(1, slots), self.c.index_select(1, slots)

    def scatter(self, slots: Tensor, state: State) -> None:
        self.h.index_copy_(1, slots, state[0])
        self.c.index_copy_(1, slots, state[1])


# ---------------------------------------------------------------------------- engine


class Engine:
    """Runs the decode loop of one model version in its own thread."""

    def __init__(
        self,
        model: LSTMLanguageModel,
        tokenizer: Tokenizer,
        *,
        model_id: str,
        max_running: int,
        device: torch.device,
        metrics: Metrics,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.metrics = metrics
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        self.states = StateSlots(cfg.layers, cfg.hidden_dim, max_running, device, dtype)
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{model_id}", daemon=True)

    # -- called from the event loop ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        seq.submitted_at = now()
        self.metrics.waiting.inc()
        self._inbox.put(seq)

    def stop(self) -> None:
        """Ask the thread to end; sequences still inside get a retryable Failed event."""
        self._inbox.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("engine %s: started on %s", self.model_id, self.device)
        with torch.inference_mode():
            while not self._stopping:
                self._admit()
                if self._running:
                    self._decode()
        self._fail_all("the model version was unloaded; retry the request")
        log.info("engine %s: stopped", self.model_id)

    def _admit(self) -> None:
        """Take new sequences from the inbox (blocking only when idle), then prefill into free slots."""
        idle = not self._running and not self._waiting
        try:
            item = self._inbox.get(block=idle)
            while True:
                if item is None:
                    self._stopping = True
                    return
                self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._drop_cancelled_waiting()
        while self._waiting and self.states.available:
            seq = self._waiting.popleft()
            self.metrics.waiting.dec()
            self._prefill(seq)

    def _drop_cancelled_waiting(self) -> None:
        """A client that leaves while its sequence waits frees its place at once, not when a slot opens."""
        if not any(seq.cancelled for seq in self._waiting):
            return
        kept: deque[Sequence] = deque()
        for seq in self._waiting:
            if seq.cancelled:
                seq.done = True
                self.metrics.waiting.dec()
            else:
                kept.append(seq)
        self._waiting = kept

    def _prefill(self, seq: Sequence) -> None:
        """Run the whole prompt in one forward call, keep its state, sample the first token."""
        seq.slot = self.states.alloc()
        self.metrics.running.inc()
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        try:
            ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
            logits, state = self.model(ids)  # (1, T, V)
            self.states.write(seq.slot, state)
            self._emit([seq], logits[:, -1])  # (1, V)
        except Exception:
            log.exception("engine %s: prefill failed for sequence %s", self.model_id, seq.id)
            self._end(seq, Failed("generation failed on the server; it has been logged", retryable=True))
            return
        if not seq.done:
            self._running.append(seq)

    def _decode(self) -> None:
        """One batched step for every running sequence; cancelled ones leave first."""
        for seq in [s for s in self._running if s.cancelled]:
            self._end(seq, None)
        if not self._running:
            return
        batch = list(self._running)
        self.metrics.batch_size.observe(len(batch))
        try:
            logits = self._step(batch)  # (B, V)
            self._emit(batch, logits)
        except Exception:
            log.exception("engine %s: decode step failed for %d sequences", self.model_id, len(batch))
            for seq in batch:
                if not seq.done:
                    self._end(seq, Failed("generation failed on the server; it has been logged", retryable=True))

    def _step(self, batch: list[Sequence]) -> Tensor:
        """One token for every sequence of the batch: (B, 1) ids + gathered state -> logits (B, V)."""
        tokens = torch.tensor([[s.last_token] for s in batch], dtype=torch.long, device=self.device)  # (B, 1)
        slots = torch.tensor([s.slot for s in batch], dtype=torch.long, device=self.device)  # (B,)
        state = self.states.gather(slots)  # (layers, B, H) x2
        logits, state = self.model(tokens, state)  # (B, 1, V)
        self.states.scatter(slots, state)
        return logits[:, -1]

    def _emit(self, batch: list[Sequence], logits: Tensor) -> None:
        """Sample each row of logits (B, V) on its sequence's sampler and deliver the text."""
        rows = logits.detach().to("cpu", torch.float32)  # (B, V): sampling runs on CPU, as in lm.sampler
        t = now()
        for seq, row in zip(batch, rows, strict=True):
            sampler = seq.sampler
            token_id = sampler.choose(row)
            event = Token(sampler.push(token_id), token_id)
            if seq.logprobs is not None:
                event.logprob, event.top_logprobs = sampler.logprobs(row, token_id, seq.logprobs)
            seq.last_token = token_id
            self._observe_token(seq, t)
            seq.deliver(event)
            if sampler.finished:
                rest = sampler.flush()
                if rest:
                    seq.deliver(Token(rest, None))
                self.metrics.e2e.observe(t - seq.submitted_at)
                self._end(seq, Finished(sampler.finish_reason or "length", sampler.usage))

    def _observe_token(self, seq: Sequence, t: float) -> None:
        self.metrics.generated_tokens.inc()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(t - seq.submitted_at)
        else:
            self.metrics.inter_token.observe(t - seq.last_token_at)
        seq.last_token_at = t

    def _end(self, seq: Sequence, event: Event | None) -> None:
        """Free the sequence's slot; deliver its last event (None for a cancelled one, nobody listens)."""
        if seq.slot is not None:
            self.states.release(seq.slot)
            seq.slot = None
            self.metrics.running.dec()
        if seq in self._running:
            self._running.remove(seq)
        if event is not None:
            seq.deliver(event)
        else:
            seq.done = True

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running):
            self._end(seq, Failed(message))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._waiting.append(item)
        for seq in self._waiting:
            self.metrics.waiting.dec()
            seq.deliver(Failed(message))
        self._waiting.clear()
