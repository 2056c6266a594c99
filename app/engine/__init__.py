"""The generation engine: continuous batching of LSTM decode steps in one thread per model version.

A request becomes a `Sequence` and is submitted to the engine of the model version it pinned.
The engine's thread loops:

    admit    take new sequences from the inbox into the waiting line (blocking only when idle)
    prefill  hand waiting prompts to the engine's prefill thread, at most `prefill_chunk` tokens
             per batch, each prompt as one sequence (`step.prefill`: all layers along a wavefront)
             or several together, starting from the longest cached prefix state
             (app/prompt_cache.py); when a batch is done, a finished prompt takes a state row and its
             last logits give its first token. Prompts run WHILE the running batch decodes: a
             batch and a decode step are each one call into the native int8 loops, which release
             the GIL (lm/kernels/native.py), so on two cores a new prompt does not stall every running
             stream for its prefill
    step     ONE batched decode step for every running sequence (lm/decode/: int8, fused fp32 or
             the reference nn.LSTM): last tokens (B,) + state rows (layers, B, H) -> logits (B, V),
             states updated in place; then the whole batch is sampled at once (lm/batch_sampler.py)
    deliver  the streams' text is coalesced and handed to the event loop every `stream_interval_s`
             for all streams together (a stream's first text at once, its last with its end),
             with ONE call_soon_threadsafe per hand-off for all the sequences of a loop
    drop     finished and cancelled rows leave; the last row moves into the hole, so the running
             sequences always occupy rows 0..B-1 and the step works on views, not gathered copies

Prefill is chunked so that a long prompt cannot hold back the prompts behind it for more than one
chunk. Only the engine thread touches the waiting line, the state rows and the prompt cache; the
prefill thread works on the sequences' own prefill states and hands them back. An LSTM's state is
a fixed (layers, H) pair per sequence, so there is no KV cache to grow or page.
When nothing runs the thread blocks on its inbox (no busy loop).

    events.py     `Sequence` (one prompt being continued) and the events it gets back
    admission.py  the process-wide bound on admitted sequences, and each API key's own
    slots.py      the running sequences' states, rows 0..B-1 of two tensors
    loop.py       `Engine`, its thread and its options
"""

from app.engine.admission import Admission, KeyLimits, Overloaded
from app.engine.events import Event, Failed, Finished, Sequence, State, Token
from app.engine.loop import Engine, EngineOptions
from app.engine.slots import StateSlots

__all__ = [
    "Admission",
    "Engine",
    "EngineOptions",
    "Event",
    "Failed",
    "Finished",
    "KeyLimits",
    "Overloaded",
    "Sequence",
    "State",
    "StateSlots",
    "Token",
]
