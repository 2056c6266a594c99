"""From a validated request to sequences in an engine, and back: the glue every generation route shares.

`start_generation()` pins a model version, checks the limits that depend on settings (max_tokens
cap, prompt length, the admission bound -> 429), and submits one `Sequence` per (prompt, choice).
The `Generation` it returns must be closed exactly once, in a `finally` (or by `EventStream`'s
`on_close`): that cancels what still runs, frees the admission slots and releases the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import abc
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from app import schemas
from app.auth import may_load
from app.engine import Admission, Event, Failed, Finished, KeyLimits, Overloaded, Sequence, Token
from app.errors import ApiError, invalid
from app.holder import Lease, LoadedModel, ModelHolder
from app.metrics import Metrics
from app.schemas import StructuredOutputs
from app.settings import Settings
from app.sse import wait_for_disconnect
from lm.constrain import CompiledConstraint, Constraint
from lm.errors import ConfigError
from lm.sampler import SamplingParams, SequenceSampler, prompt_ids
from lm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class SequenceResult:
    """What one sequence produced, for a non-streaming answer."""

    text: str
    finish_reason: str
    usage: dict[str, int]
    tokens: list[Token] = field(default_factory=list)  # the generated tokens, with logprobs when asked


@dataclass(eq=False)
class Generation:
    """One request's sequences, all on one pinned model version."""

    lease: Lease
    sequences: list[Sequence]
    queue: asyncio.Queue[tuple[int, Event]]
    admission: Admission
    metrics: Metrics
    key_limits: KeyLimits | None = None
    key: str | None = None  # the client, counted in key_limits: its API key's digest, or "ip:<address>"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    closed: bool = False
    slots_freed: bool = False
    # what the per-version metrics and the canary watch see (app/canary.py)
    created_at: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # seconds from submission to the first token
    failed: bool = False  # a sequence failed on the server
    reasons: list[str] = field(default_factory=list)  # the finished sequences' finish reasons

    @property
    def model_id(self) -> str:
        return self.lease.model_id

    @property
    def tokenizer(self) -> Tokenizer:
        return self.lease.loaded.checkpoint.tokenizer

    @property
    def headers(self) -> dict[str, str]:
        return version_headers(self.lease)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(sequence index, event) as they come, until every sequence has finished or failed."""
        remaining = len(self.sequences)
        while remaining:
            index, event = await self.queue.get()
            if isinstance(event, Token) and self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.created_at
            elif isinstance(event, Finished):
                self.reasons.append(event.finish_reason)
            elif isinstance(event, Failed):
                self.failed = True
            if isinstance(event, Finished | Failed):
                remaining -= 1
                if not remaining:  # the engine holds none of them: free the slots before the last event
                    self._free_slots()  # reaches the client, which may send its next request at once
            yield index, event

    async def collect(self) -> list[SequenceResult]:
        """Wait for every sequence; the completions in sequence order. A failed one raises ApiError."""
        texts: list[list[str]] = [[] for _ in self.sequences]
        tokens: list[list[Token]] = [[] for _ in self.sequences]
        done: dict[int, SequenceResult] = {}
        async for index, event in self.events():
            if isinstance(event, Token):
                texts[index].append(event.text)
                if event.token_id is not None:
                    tokens[index].append(event)
            elif isinstance(event, Finished):
                done[index] = SequenceResult("".join(texts[index]), event.finish_reason, event.usage, tokens[index])
            else:
                raise ApiError(503 if event.retryable else 500, event.message)
        return [done[i] for i in range(len(self.sequences))]

    def close(self, dropped: str | None = None) -> None:
        """Cancel what still runs (the engine drops it before its next step) and release everything.

        `dropped`: why the client will not read the rest, "disconnected" or "stalled" (it accepted no bytes
        for TEXTGEN_STALL_TIMEOUT_S), counted in `textgen_generations_dropped_total` when sequences were cut.
        """
        if self.closed:
            return
        self.closed = True
        unfinished = [s for s in self.sequences if not s.done]
        for seq in unfinished:
            seq.cancel()
        if dropped and unfinished:
            self.metrics.dropped.labels(reason=dropped).inc()
            log.info("request %s: client %s, %d sequences dropped", self.id, dropped, len(unfinished))
        self._free_slots()
        outcome = "failed" if self.failed else "cancelled" if unfinished else "ok"
        self.metrics.version_done(self.model_id, self.lease.alias, outcome, self.reasons)  # while still loaded
        if outcome != "cancelled":
            watch = self.lease.holder.canary
            watch.record(self.lease.alias, self.model_id, failed=self.failed, ttft_s=self.first_token_s)
        self.lease.release()

    def _free_slots(self) -> None:
        if self.slots_freed:
            return
        self.slots_freed = True
        self.admission.release(len(self.sequences))
        if self.key_limits is not None:
            self.key_limits.release(self.key, len(self.sequences))


def check_params(params: SamplingParams, settings: Settings, request: Request) -> None:
    if params.max_tokens > settings.max_tokens:
        raise invalid(
            f"max_tokens is {params.max_tokens}; the limit is TEXTGEN_MAX_TOKENS={settings.max_tokens}",
            "max_tokens",
            request,
        )
    try:
        params.validate()
    except ConfigError as e:
        raise invalid(str(e), e.param, request) from None


def check_prompt(prompt: str | list[int], settings: Settings, request: Request, param: str = "prompt") -> None:
    """A text prompt holds at most TEXTGEN_MAX_PROMPT_CHARS characters, a prompt of token ids as many ids."""
    limit = settings.max_prompt_chars
    if len(prompt) > limit:
        unit = "characters" if isinstance(prompt, str) else "tokens"
        message = f"the prompt has {len(prompt)} {unit}; the limit is TEXTGEN_MAX_PROMPT_CHARS={limit}"
        raise invalid(message, param, request)


def token_ids(tokenizer: Tokenizer, prompt: str | list[int], request: Request, param: str = "prompt") -> list[int]:
    """The ids a prompt feeds: a text's encoding (an empty text: the start token), or token ids as given,
    each checked against the model's vocabulary."""
    if isinstance(prompt, str):
        return prompt_ids(tokenizer, prompt)
    bad = next((t for t in prompt if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        message = f"token id {bad} is outside the model's vocabulary (ids 0 to {tokenizer.vocab_size - 1})"
        raise invalid(message, param, request)
    return list(prompt)


async def start_generation(
    *,
    request: Request,
    holder: ModelHolder,
    admission: Admission,
    settings: Settings,
    prompts: abc.Sequence[str | list[int]],
    params: list[SamplingParams],
    model: str | None = None,
    lease: Lease | None = None,
    logprobs: int | None = None,
    prompt_param: str = "prompt",
    constraint: Constraint | None = None,
    user: str | None = None,
) -> Generation:
    """Check limits, pin the model (or take over `lease`), submit one sequence per (prompt, params), each
    constrained by `constraint` when there is one (compiled for the model's tokenizer, or from its cache).

    ApiError 404 (unknown model), 422/400 (limits), 400 (a constraint the library refuses, or one the model's
    vocabulary cannot spell), 429 (overload, or the client's own limit), 503 (no model loaded).
    """
    key_limits: KeyLimits = request.app.state.key_limits
    key = client_key(request)
    try:
        if len(params) > admission.capacity:
            message = f"{len(params)} sequences asked; this server runs at most {admission.capacity} at a time"
            raise invalid(message, "n", request)
        if key_limits.applies(key) and len(params) > key_limits.limit:
            message = (
                f"{len(params)} sequences asked; one {key_limits.client} may run at most "
                f"{key_limits.setting}={key_limits.limit} at a time"
            )
            raise invalid(message, "n", request)
        for p in params:
            check_params(p, settings, request)
        for prompt in prompts:
            check_prompt(prompt, settings, request, prompt_param)
    except ApiError:
        if lease is not None:
            lease.release()
        raise
    if lease is None:
        lease = await lease_model(holder, request, model, user)
    try:
        compiled = await compile_constraint(lease.loaded, constraint) if constraint is not None else None
        tokenizer = lease.loaded.checkpoint.tokenizer
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sequences = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            ids = token_ids(tokenizer, prompt, request, prompt_param)
            sampler = SequenceSampler(tokenizer, p, ids, compiled)
            series = holder.metrics.version(lease.model_id, lease.alias)
            sequences.append(Sequence(ids, sampler, loop, queue, index=i, logprobs=logprobs, series=series))
        await _admit(admission, key_limits, key, len(sequences), holder.metrics, settings)
        generation = Generation(lease, sequences, queue, admission, holder.metrics, key_limits=key_limits, key=key)
    except BaseException:
        lease.release()
        raise
    try:
        for seq in sequences:
            lease.loaded.engine.submit(seq)
    except BaseException:
        generation.close()  # frees the slots and the lease
        raise
    return generation


async def lease_model(holder: ModelHolder, request: Request, model: str | None, user: str | None = None) -> Lease:
    """Pin the version that serves this request: `model` (a model id or an alias; None: production), an
    alias's version picked by the request's routing key (`route_key`)."""
    return await holder.lease(model, may_load=may_load(request, model), route_key=route_key(request, user))


def route_key(request: Request, user: str | None = None) -> str | None:
    """What picks an alias's version: the first of the OpenAI `user` field, the X-Route-Key header, the API
    key (its digest, app/auth.py); None (a random draw per request) without any of them."""
    return user or request.headers.get("x-route-key") or getattr(request.state, "key_id", None)


def version_headers(lease: Lease) -> dict[str, str]:
    """X-Model-Version (the version that serves the answer) and, when an alias was resolved, X-Model-Alias."""
    headers = {"X-Model-Version": lease.model_id}
    if lease.alias is not None:
        headers["X-Model-Alias"] = lease.alias
    return headers


def request_constraint(structured_outputs: StructuredOutputs | None, response_format: Any = None) -> Constraint | None:
    """The request's constraint (vLLM's structured_outputs or OpenAI's response_format), or None; ApiError 400
    when both are given, or structured_outputs holds not exactly one kind."""
    try:
        return schemas.request_constraint(structured_outputs, response_format)
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None


async def compile_constraint(loaded: LoadedModel, constraint: Constraint) -> CompiledConstraint:
    """The constraint compiled for this model version's tokenizer: from its LRU, or compiled in a thread
    (a large JSON schema takes milliseconds). ApiError 400 with the library's message when it is refused."""
    compiler = loaded.constraints
    try:
        compiled = compiler.cached(constraint)
        if compiled is None:
            compiled = await asyncio.to_thread(compiler.compile, constraint)
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
    return compiled


def client_limits(settings: Settings) -> KeyLimits:
    """The per-client limit (`app.state.key_limits`): per API key on a server with keys, else per client address."""
    if settings.auth_enabled:
        return KeyLimits(settings.max_running_per_key)
    limit = settings.max_running_per_client
    if limit is None:  # one address may fill the decode batch, never the waiting room too: others queue first
        limit = settings.max_running
    return KeyLimits(limit, client="client address", setting="TEXTGEN_MAX_RUNNING_PER_CLIENT", code="client_overloaded")


def client_key(request: Request) -> str | None:
    """Who a request's sequences count against: its API key's digest (app/auth.py), or on a server without
    keys its address, "ip:<address>" (the peer, or X-Forwarded-For from TEXTGEN_TRUSTED_PROXIES: uvicorn's
    ProxyHeadersMiddleware has already put it in the scope, app/server.py)."""
    key: str | None = getattr(request.state, "key_id", None)
    if key is None and request.client is not None and not request.app.state.settings.auth_enabled:
        key = f"ip:{request.client.host}"
    return key


@contextlib.asynccontextmanager
async def admitted(request: Request, admission: Admission, metrics: Metrics, settings: Settings) -> AsyncIterator[None]:
    """One admission slot (the process-wide bound and the client's own, 429 when either is full) held
    for work that runs outside the engines, such as scoring a request's prompts."""
    key_limits: KeyLimits = request.app.state.key_limits
    key = client_key(request)
    await _admit(admission, key_limits, key, 1, metrics, settings)
    try:
        yield
    finally:
        admission.release(1)
        key_limits.release(key, 1)


async def _admit(
    admission: Admission, key_limits: KeyLimits, key: str | None, n: int, metrics: Metrics, settings: Settings
) -> None:
    """The client's own limit first (after a moment's grace for its own slots to come back), then the
    process-wide bound; 429 with Retry-After when either is full."""
    try:
        await key_limits.acquire_soon(key, n)
    except Overloaded as e:
        raise _overloaded(f"{e}; other clients are not affected", key_limits.code, metrics, settings) from None
    try:
        admission.acquire(n)
    except Overloaded as e:
        key_limits.release(key, n)
        raise _overloaded(f"the server is at capacity ({e})", "overloaded", metrics, settings) from None


def _overloaded(reason: str, code: str, metrics: Metrics, settings: Settings) -> ApiError:
    metrics.rejected.inc()
    return ApiError(
        429,
        f"{reason}; retry after {settings.retry_after_s} s",
        code=code,
        headers={"Retry-After": str(settings.retry_after_s)},
    )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give up as soon as the client disconnects (raises ClientDisconnect)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()
