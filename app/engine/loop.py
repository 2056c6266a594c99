"""The engine's loop: one thread per model version, continuous batching of LSTM decode steps.

app/engine/__init__.py describes each turn of the loop; this module is the loop itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from app.engine.events import Event, Failed, Finished, Sequence, State, Token, deliver_all
from app.engine.slots import StateSlots
from app.metrics import Metrics, now
from app.prompt_cache import PromptCache
from lm.batch_sampler import advance_constraints, choose_batch
from lm.decode import ReferenceStep, Step
from lm.decode.tune import Pins, Plan, build_planned, tune
from lm.model import LSTMLanguageModel
from lm.tokenizers import Tokenizer

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)


class _Wake:
    """Put in an engine's inbox when its prefill batch ends, to wake a thread blocked on the inbox."""


WAKE = _Wake()
PREFILL_MIN_POSITIONS = 32  # positions a batched prefill advances each of its prompts, at least
PREFILL_SPLIT_MIN = 8  # prompts each thread takes when a burst is split over the engine and prefill threads
DECODE_CHUNK_S = 0.004  # the service's decode chunk: at most this long of steps per native call (see _decode)
DECODE_CHUNK_MAX = 32  # steps
sched_yield = getattr(os, "sched_yield", lambda: None)  # POSIX


@dataclass(frozen=True)
class EngineOptions:
    """How an engine decodes. The defaults are the plain engine (reference step, an event per token, no
    cache); the service builds its options from the TEXTGEN_* settings (docs/PERFORMANCE.md)."""

    decode: str = "reference"  # lm.decode.DECODE_KINDS, or "auto": the fastest kind by measurement
    threads: int | None = None  # the engine's torch threads; None: by measurement (lm/decode/tune.py)
    int8_product: str = "auto"  # int8 in C++: "vnni", "onednn" or "auto" (by measurement)
    tune_cache_dir: Path | None = None  # where measurements are kept across restarts; None: not kept
    stream_interval_s: float = 0.0  # coalesce a stream's text for at most this long; 0 = an event per token
    prompt_cache_bytes: int = 0  # 0 = no prompt-state cache
    prefill_chunk: int = 256  # prompt tokens per prefill batch (in total, over its prompts)
    prefill_thread: bool = False  # prefill on the engine's own prefill thread, beside decoding
    decode_chunk_s: float = 0.0  # up to this long of decode steps in one native call when nothing waits; 0 = one
    native_loops: bool = True  # int8: the step's loops in C++ when built (lm/kernels/native.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineOptions:
        return cls(
            decode=settings.decode,
            threads=settings.threads,
            int8_product=settings.int8_product,
            tune_cache_dir=settings.tune_cache_dir,
            stream_interval_s=settings.stream_interval_ms / 1000,
            prompt_cache_bytes=int(settings.prompt_cache_mb * 2**20),
            prefill_chunk=settings.prefill_chunk,
            prefill_thread=settings.prefill_thread,
            decode_chunk_s=DECODE_CHUNK_S,
            native_loops=settings.native,
        )


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
        options: EngineOptions | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.metrics = metrics
        self.options = options or EngineOptions()
        self.step: Step | None = None  # built in the engine thread: quantizing weights must not block the loop
        self.plan = Plan("reference", "Python", "-", 1, 0, "pinned")  # chosen in the engine thread, with the step
        self.ready = threading.Event()  # set once the step is built: the holder swaps a version in after that
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        self.states = StateSlots(cfg.layers, cfg.hidden_dim, max_running, device, dtype)
        budget = self.options.prompt_cache_bytes
        self.cache = None
        if budget > 0:
            self.cache = PromptCache(
                budget, layers=cfg.layers, hidden=cfg.hidden_dim, vocab=cfg.vocab_size, device=device
            )
        self._inbox: queue.SimpleQueue[Sequence | _Wake | None] = queue.SimpleQueue()
        self._prefiller: ThreadPoolExecutor | None = None  # started in the engine thread
        self._prefill: tuple[list[Sequence], Future[None]] | None = None  # the prefill batch in flight
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # _running[i].slot == i
        self._outbox: list[tuple[Sequence, Event]] = []  # events of this turn, delivered together
        self._tick_at = now()  # when the running streams' coalesced text last went out
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
        try:
            self._choose_step()
        finally:
            self.ready.set()
        # OpenMP's thread count is per thread: each of the engine's threads sets the plan's, or its
        # kernels would fork the default team (one per core) whatever the main thread has
        threads = self.plan.threads
        torch.set_num_threads(threads)
        if self.options.prefill_thread:
            self._prefiller = ThreadPoolExecutor(
                1, thread_name_prefix=f"prefill-{self.model_id}", initializer=torch.set_num_threads, initargs=(threads,)
            )
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._iterate()
                except Exception:  # a bug must fail this batch's requests, not stop the engine for good
                    log.exception("engine %s: a step failed; failing its sequences", self.model_id)
                    self._fail_all("the server could not continue this generation; retry the request")
                    self._flush()
            self._wait_for_prefill()
            self._fail_all("the model version was unloaded; retry the request")
            self._flush()
        if self._prefiller is not None:
            self._prefiller.shutdown(wait=True)
        if self.cache is not None:
            self.metrics.prompt_cache_bytes.dec(self.cache.clear())
        log.info("engine %s: stopped", self.model_id)

    def _choose_step(self) -> None:
        """Measure (or read from the cache) which step serves fastest here, and build it."""
        options = self.options
        pins = Pins(
            kind=None if options.decode == "auto" else options.decode,
            threads=options.threads,
            product=None if options.int8_product == "auto" else options.int8_product,
        )
        try:
            self.plan = tune(
                self.model,
                max_running=self.states.h.shape[1],
                pins=pins,
                native_loops=options.native_loops,
                cache_dir=options.tune_cache_dir,
            )
            self.step = build_planned(self.model, self.plan)
        except Exception:  # the model's own forward always works: serve slower rather than not at all
            log.exception("engine %s: could not build the planned decode step; serving the reference", self.model_id)
            self.plan = Plan("reference", "Python", "-", torch.get_num_threads(), 0, "pinned")
            self.step = ReferenceStep(self.model)
        log.info("engine %s: started on %s; decode step %s", self.model_id, self.device, self.plan.summary())
        self.metrics.observe_plan(self.plan)

    def _iterate(self) -> None:
        """One turn of the loop: admit, prefill, then one batched decode step."""
        self._admit()
        if self._stopping:
            return
        self._prefill_waiting()
        self._flush()  # a first token goes out before the next decode step
        if self._running:
            self._decode()
            self._flush()

    def _admit(self) -> None:
        """Take new sequences from the inbox, blocking only when there is nothing else to do (a
        prefill batch that ends wakes the thread through the inbox)."""
        idle = not self._running and (not self._waiting or self._prefilling())
        try:
            item = self._inbox.get(block=idle)
            while True:
                if item is None:
                    self._stopping = True
                    return
                if not isinstance(item, _Wake):
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._drop_cancelled_waiting()

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

    # -- prefill ----------------------------------------------------------------------------------

    def _prefill_waiting(self) -> None:
        """Collect the prefill batch that ended, then hand the oldest waiting sequences that fit in free
        rows to the prefill thread, all together, as the next batch.

        One prompt runs alone through `step.prefill` (up to `prefill_chunk` tokens); several run as
        a batch, one decode step per position for all of them (`prefill_chunk` tokens in total per
        job), which costs far less than running them one by one. In int8 a row's state does not
        depend on its batch, so both give the same state.
        """
        if self._prefill is not None:
            rows, running = self._prefill
            if not running.done():
                return
            self._prefill = None
            self._collect_prefill(rows, running.exception())
        rows = list(itertools.islice(self._waiting, self.states.available))
        for seq in rows:
            if not seq.started:
                self._start_prefill(seq)
        for seq in [s for s in rows if s.prefilled == len(s.prompt_ids)]:  # the whole prompt was cached
            self._join(seq)
            rows.remove(seq)
        if not rows:
            return
        here: list[Sequence] = []
        if self._prefiller is None:  # no prefill thread: the batch runs here, between two decode steps
            rows, here = [], rows
        elif not self._running and len(rows) >= 2 * PREFILL_SPLIT_MIN:
            # a burst with nothing to decode: this thread takes half of it, so both cores prefill
            rows, here = rows[: len(rows) // 2], rows[len(rows) // 2 :]
        if rows:
            running = self._prefiller.submit(self._run_prefill, rows, self.options.prefill_chunk)  # type: ignore[union-attr]
            running.add_done_callback(lambda _: self._inbox.put(WAKE))
            self._prefill = rows, running
        if here:
            error: BaseException | None = None
            try:
                self._run_prefill(here, self.options.prefill_chunk)
            except Exception as exc:
                error = exc
            self._collect_prefill(here, error)

    def _run_prefill(self, rows: list[Sequence], budget: int) -> None:
        """On the prefill thread: advance these prompts; only their own prefill fields change."""
        with torch.inference_mode():
            if len(rows) == 1:
                self._prefill_one(rows[0], budget)
            else:
                self._prefill_batch(rows, budget)

    def _prefilling(self) -> bool:
        return self._prefill is not None and not self._prefill[1].done()

    def _collect_prefill(self, rows: list[Sequence], error: BaseException | None) -> None:
        """A prefill batch ended (with `error` if it raised): remember each prompt's state, and fully prefilled
        sequences join the batch. Sequences that left meanwhile (cancelled, or failed by a stop) are
        passed over."""
        rows = [seq for seq in rows if not seq.done]
        if error is not None:
            log.error("engine %s: prefill failed for %d sequences", self.model_id, len(rows), exc_info=error)
            for seq in rows:
                self._leave_waiting(seq)
                self._outbox.append((seq, Failed("generation failed on the server; it has been logged")))
            return
        for seq in rows:
            assert seq.prefill_state is not None and seq.prefill_logits is not None
            h, c = seq.prefill_state
            self._remember(seq.prompt_ids[: seq.prefilled], h[:, 0], c[:, 0], seq.prefill_logits)
            if seq.prefilled == len(seq.prompt_ids):
                self._join(seq)

    def _wait_for_prefill(self) -> None:
        """Before failing everything on stop: let the prefill batch in flight end (it touches only its rows)."""
        if self._prefill is not None:
            self._prefill[1].exception()  # waits; its failure, if any, is moot now
            self._prefill = None

    def _leave_waiting(self, seq: Sequence) -> None:
        self.metrics.waiting.dec()
        self._waiting.remove(seq)

    def _start_prefill(self, seq: Sequence) -> None:
        """Start from the longest cached prefix of the prompt, if any."""
        seq.started = True
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        if self.cache is None or len(seq.prompt_ids) < self.cache.min_tokens:
            return  # too short to be cached: neither a hit nor a miss
        entry = self.cache.lookup(seq.prompt_ids)
        if entry is None:
            self.metrics.prompt_cache_misses.inc()
            return
        self.metrics.prompt_cache_hits.inc()
        self.metrics.prompt_cache_tokens.inc(entry.length)
        seq.prefilled = entry.length
        # copies: the entry's tensors are views of a cache row that a later put may reuse
        seq.prefill_state = entry.h[:, None].clone(), entry.c[:, None].clone()  # (layers, 1, H)
        seq.prefill_logits = entry.logits.clone()

    def _prefill_one(self, seq: Sequence, budget: int) -> None:
        """Run the next (at most `budget`) prompt tokens of one sequence as one sequence call."""
        start = seq.prefilled
        ids = seq.prompt_ids[start : start + budget]
        if seq.prefill_state is None:
            seq.prefill_state = self._zero_state()
        h, c = seq.prefill_state  # (layers, 1, H), updated in place
        x = torch.tensor(ids, dtype=torch.long, device=self.device)  # (T,)
        seq.prefill_logits = self.step.prefill(x, h, c)  # type: ignore[union-attr]  # (V,); built in _run
        seq.prefilled = start + len(ids)

    def _prefill_batch(self, rows: list[Sequence], budget: int) -> None:
        """Advance k prompts by the same n positions: n batched steps over (layers, k, H) states.

        n is the budget shared out, but at least PREFILL_MIN_POSITIONS (or the shortest prompt's rest):
        a burst of prompts then runs as a few long batches at the batch size the big products are
        fast at, rather than many short ones whose bookkeeping costs as much as their steps (64
        200-token prompts at once: 51 batches of 4 positions against 7 of 32; their first tokens
        over HTTP 420-495 -> 270-285 ms on the 2-core Xeon of docs/PERFORMANCE.md)."""
        k = len(rows)
        shortest = min(len(s.prompt_ids) - s.prefilled for s in rows)
        n = max(1, min(shortest, max(budget // k, PREFILL_MIN_POSITIONS)))
        states = [s.prefill_state or self._zero_state() for s in rows]
        h = torch.cat([state[0] for state in states], dim=1)  # (layers, k, H)
        c = torch.cat([state[1] for state in states], dim=1)
        ids = torch.tensor([s.prompt_ids[s.prefilled : s.prefilled + n] for s in rows], device=self.device)  # (k, n)
        logits = self.step.steps(ids, h, c)  # type: ignore[union-attr]  # (k, V); states updated in place
        for i, seq in enumerate(rows):
            seq.prefill_state = h[:, i : i + 1], c[:, i : i + 1]
            seq.prefill_logits = logits[i]
            seq.prefilled += n

    def _zero_state(self) -> State:
        shape = (self.states.h.shape[0], 1, self.states.h.shape[2])  # (layers, 1, H)
        h = torch.zeros(shape, device=self.device, dtype=self.states.h.dtype)
        return h, torch.zeros_like(h)

    def _remember(self, ids: list[int], h: Tensor, c: Tensor, logits: Tensor) -> None:
        if self.cache is not None:
            self.metrics.prompt_cache_bytes.inc(self.cache.put(ids, h, c, logits))

    def _join(self, seq: Sequence) -> None:
        """A fully prefilled sequence leaves the waiting line, takes a state row and samples its first token."""
        assert seq.prefill_state is not None and seq.prefill_logits is not None
        self._leave_waiting(seq)
        seq.slot = self.states.add(seq.prefill_state)
        self._running.append(seq)
        self.metrics.running.inc()
        logits = seq.prefill_logits[None]  # (1, V)
        seq.prefill_state = seq.prefill_logits = None
        self._sample([seq], logits)

    # -- decode -----------------------------------------------------------------------------------

    def _decode(self) -> None:
        """One batched step for every running sequence; cancelled ones leave first."""
        for seq in [s for s in self._running if s.cancelled]:
            self._end(seq, None)
        if not self._running:
            return
        batch = list(self._running)
        self.metrics.batch_size.observe(len(batch))
        try:
            tokens = torch.tensor([s.last_token for s in batch], dtype=torch.long, device=self.device)  # (B,)
            h, c = self.states.rows()  # (layers, B, H) views, updated in place
            n = self._steps_at_once(batch)
            if n > 1:
                started = now()
                ids, logits = self.step.decode(tokens, h, c, n, [s.sampler for s in batch])  # type: ignore[union-attr]
                self._take_chunk(batch, ids.tolist(), logits, started)
            else:
                logits = self.step(tokens, h, c)  # type: ignore[misc]  # (B, V); built in _run
                self._sample(batch, logits)
            self._tick(now())
        except Exception:
            log.exception("engine %s: decode step failed for %d sequences", self.model_id, len(batch))
            for seq in batch:
                if not seq.done:
                    self._end(seq, Failed("generation failed on the server; it has been logged", retryable=True))

    def _steps_at_once(self, batch: list[Sequence]) -> int:
        """How many decode steps to run in one native call (vLLM's multi-step scheduling): up to
        `decode_chunk_s` of them at this batch size (from the plan's measured speed), when nothing
        waits to join the batch and no row needs its logits seen token by token (logprobs, the
        penalties, which count tokens as they come, or a bias that varies per step: `bias_varies`).
        One step otherwise. The tokens are the same
        either way; the Python work between two steps (the call, the sampler's dispatch) is paid
        once per chunk: at one stream it was as much as the step (docs/PERFORMANCE.md)."""
        chunk_s = self.options.decode_chunk_s
        if chunk_s <= 0 or not hasattr(self.step, "decode") or self._waiting or self._prefill is not None:
            return 1
        if not self._inbox.empty():
            return 1
        for seq in batch:
            p = seq.sampler.params
            if seq.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                return 1
            if seq.sampler.bias_varies:
                return 1
        rates = self.plan.chosen_tokens_per_s()
        size = min((b for b in rates if b >= len(batch)), default=max(rates, default=0))
        steps_per_s = rates[size] / size if size else 0.0
        left = min(s.sampler.params.max_tokens - s.sampler.completion_tokens for s in batch)
        return max(1, min(left, DECODE_CHUNK_MAX, int(chunk_s * steps_per_s)))

    def _take_chunk(self, batch: list[Sequence], ids: list[list[int]], logits: Tensor, started: float) -> None:
        """The tokens of a chunk of steps, row by row as `_sample` takes one step's: a row that finishes
        inside the chunk leaves there (its state went on past its end, so its completion is not cached)."""
        rows = logits.detach().to("cpu", torch.float32)  # (B, V) of the last step
        n = len(ids[0])
        span = now() - started
        for k in range(n):
            t = started + span * (k + 1) / n  # each token's time, spread over the chunk
            last = k == n - 1
            for i, seq in enumerate(batch):
                if seq.done:
                    continue
                token_id = ids[i][k]
                text = seq.sampler.push(token_id)
                self.metrics.generated_tokens.inc()
                self._observe_token(seq, t)
                self._queue_token(seq, token_id, text, rows, i, t)
                if seq.sampler.finished:
                    self._finish(seq, rows[i] if last else None, t)
                else:
                    seq.generated.append(token_id)
                    seq.last_token = token_id

    def _sample(self, batch: list[Sequence], logits: Tensor) -> None:
        """Choose each row's next token (one batched draw), record it, queue its text."""
        rows = logits.detach().to("cpu", torch.float32)  # (B, V): sampling runs on CPU, as in lm.sampler
        samplers = [s.sampler for s in batch]
        ids = choose_batch(samplers, rows, native_draws=self.options.native_loops)
        advance_constraints(samplers, ids)  # the constrained rows' next masks in one call
        t = now()
        self.metrics.generated_tokens.inc(len(batch))
        for i, (seq, token_id) in enumerate(zip(batch, ids, strict=True)):
            sampler = seq.sampler
            text = sampler.push(token_id)
            self._observe_token(seq, t)
            if sampler.refused is None:  # else a constraint took the token as the end: it is not in the text
                self._queue_token(seq, token_id, text, rows, i, t)
            if sampler.finished:
                self._finish(seq, rows[i], t)
            else:
                seq.generated.append(token_id)
                seq.last_token = token_id

    def _queue_token(self, seq: Sequence, token_id: int, text: str, rows: Tensor, i: int, t: float) -> None:
        """An event per token (logprobs, or interval 0); otherwise coalesce until the next tick, except
        the first text, which goes out at once."""
        interval = self.options.stream_interval_s
        if seq.logprobs is not None or interval <= 0:
            event = Token(text, token_id)
            if seq.logprobs is not None:
                event.logprob, event.top_logprobs = seq.sampler.logprobs(rows[i], token_id, seq.logprobs)
            self._outbox.append((seq, event))
            return
        seq.pending += text
        seq.pending_id = token_id
        if seq.pending and seq.flushed_at is None:
            self._flush_pending(seq, t)

    def _tick(self, t: float) -> None:
        """Every `stream_interval_s`, all running streams' pending text goes out together: one handoff
        to the event loop for all of them, instead of one per stream at its own moment."""
        if t - self._tick_at < self.options.stream_interval_s:
            return
        self._tick_at = t
        for seq in self._running:
            if seq.pending:
                self._flush_pending(seq, t)

    def _flush_pending(self, seq: Sequence, t: float) -> None:
        self._outbox.append((seq, Token(seq.pending, seq.pending_id)))
        seq.pending = ""
        seq.flushed_at = t

    def _finish(self, seq: Sequence, row: Tensor | None, t: float) -> None:
        """The sampler finished: keep the completion's state for a next turn (`row`: the logits that chose
        the last token; None when the state is not the completion's), send the rest, end."""
        sampler = seq.sampler
        if seq.generated and seq.slot is not None and row is not None:
            h, c = self.states.read(seq.slot)  # the state after prompt + generated (the last token is not fed)
            self._remember(seq.prompt_ids + seq.generated, h, c, row)
        rest = sampler.flush()
        if seq.logprobs is not None or self.options.stream_interval_s <= 0:
            if rest:
                self._outbox.append((seq, Token(rest, None)))
        else:
            seq.pending += rest
            if seq.pending:
                self._flush_pending(seq, t)
        self.metrics.e2e.observe(t - seq.submitted_at)
        self._end(seq, Finished(sampler.finish_reason or "length", sampler.usage))

    def _observe_token(self, seq: Sequence, t: float) -> None:
        series = seq.series
        if seq.last_token_at is None:
            self.metrics.ttft.observe(t - seq.submitted_at)
            if series is not None:
                series.ttft.observe(t - seq.submitted_at)
        else:
            self.metrics.inter_token.observe(t - seq.last_token_at)
            if series is not None:
                series.inter_token.observe(t - seq.last_token_at)
        seq.last_token_at = t

    # -- leaving and delivering -------------------------------------------------------------------

    def _end(self, seq: Sequence, event: Event | None) -> None:
        """Free the sequence's row; queue its last event (None for a cancelled one, nobody listens)."""
        if seq.slot is not None:
            moved = self.states.remove(seq.slot)
            last = self._running.pop()
            if moved is not None:  # the last row took the freed one
                last.slot = seq.slot
                self._running[seq.slot] = last
            seq.slot = None
            self.metrics.running.dec()
        if event is not None:
            self._outbox.append((seq, event))
        seq.done = True

    def _flush(self) -> None:
        """Hand this turn's events to their event loops: one call_soon_threadsafe per loop."""
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Event]]] = {}
        for seq, event in out:
            by_loop.setdefault(seq.loop, []).append((seq, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver_all, items)
            except RuntimeError:  # the loop is closed: the server is shutting down
                for seq, _ in items:
                    seq.cancelled = True
        # The kernel tends to wake the event loop's thread on this thread's core (the one that woke
        # it), even with another core idle, where it waited for the next decode call to end: 0.1-4 ms
        # between the hand-off and the loop running it, on the 2-core Xeon. Yielding lets it run now
        # (deliver_all and the socket writes, tens of microseconds); with nothing else waiting for this
        # core it returns at once.
        sched_yield()

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running):
            self._end(seq, Failed(message))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopping = True  # keep a stop request that was waiting in the inbox
            elif not isinstance(item, _Wake):
                self._waiting.append(item)
        for seq in self._waiting:
            self.metrics.waiting.dec()
            self._outbox.append((seq, Failed(message)))
            seq.done = True
        self._waiting.clear()
