"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Request fields, objects, chunks and errors follow OpenAI's shapes, so the official `openai`
client works with `base_url=http://host:port/v1`. Streams are `data: <chunk>` events ending with
`data: [DONE]`. With `n` > 1 and a seed, choice j samples with seed + j (otherwise all choices
would be the same text).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from app import sse
from app.auth import require_api_key
from app.chat import render_chat
from app.deps import AdmissionDep, HolderDep, SettingsDep
from app.engine import Admission, Failed, Finished, Token
from app.errors import ERROR_TYPES, error_responses, invalid
from app.generation import (
    Generation,
    SequenceResult,
    check_prompt,
    lease_model,
    request_constraint,
    start_generation,
    token_ids,
    unless_disconnected,
    version_headers,
)
from app.holder import Lease, ModelHolder
from app.logging import request_id_var
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelObject,
    ModelObjectList,
    TokenLogprob,
    TopLogprob,
    Usage,
    logit_bias_ids,
)
from app.scoring import score_prompts
from app.settings import Settings
from lm.aliases import Alias
from lm.sampler import MAX_STOP_STRINGS, SamplingParams
from lm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 500, 503),
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 200  # a chat turn usually ends earlier, at the template's stop string
DONE = sse.data_line("[DONE]")
STREAM_RESPONSES = {
    200: {
        "description": "JSON, or with `stream: true` a text/event-stream of `data: <chunk>` events, then [DONE]",
        "content": {"text/event-stream": {}},
    }
}


# ---------------------------------------------------------------------------- routes


@router.post("/completions", response_model=Completion, responses=STREAM_RESPONSES)  # type: ignore[arg-type]
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    holder: HolderDep,
    admission: AdmissionDep,
    settings: SettingsDep,
) -> Any:
    """OpenAI text completion: one choice per (prompt, n); with `echo`, the prompt first (scored with `logprobs`)."""
    constraint = request_constraint(body.structured_outputs, body.response_format)
    if body.max_tokens == 0 and not body.echo:
        message = "max_tokens 0 asks for no completion: it is only allowed with echo, which returns the prompt"
        raise invalid(message + " (and with logprobs, its tokens' log-probabilities)", "max_tokens", request)
    max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_tokens) if body.max_tokens is None else body.max_tokens
    lease, echoes = await _echo(body, request, holder, admission, settings) if body.echo else (None, None)
    if echoes is not None and max_tokens == 0:
        assert lease is not None
        lease.release()
        return _echo_only(body, echoes, lease.model_id, version_headers(lease), response, settings)
    prompts = [p for p in body.prompts for _ in range(body.n)]
    params = [_params(body, max_tokens, list(body.stop), j) for _ in body.prompts for j in range(body.n)]
    generation = await start_generation(
        request=request,
        holder=holder,
        admission=admission,
        settings=settings,
        model=body.model,
        lease=lease,
        prompts=prompts,
        params=params,
        logprobs=body.logprobs,
        constraint=constraint,
        user=body.user,
    )
    meta = {"id": f"cmpl-{generation.id}", "created": int(time.time()), "model": generation.model_id}
    headers = generation.headers
    if body.stream:
        chunks = completion_chunks(
            generation,
            meta,
            n=body.n,
            include_usage=body.include_usage,
            logprobs=body.logprobs is not None,
            echoes=echoes,
        )
        return sse.EventStream(chunks, keepalive_s=settings.keepalive_s, on_close=generation.close, headers=headers)
    done = await _collect(generation, request)
    response.headers.update(headers)
    choices = []
    for i, c in enumerate(done):
        echo = echoes[i // body.n] if echoes is not None else Echo("", None, 0)
        logprobs = None
        if body.logprobs is not None:
            logprobs = _joined(echo.logprobs, _completion_logprobs(c.tokens, generation.tokenizer, len(echo.text)))
        choices.append(
            CompletionChoice(
                index=i,
                text=echo.text + c.text,
                logprobs=logprobs,
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
            )
        )
    return Completion.model_validate({**meta, "choices": choices, "usage": _usage(generation, done, body.n)})


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSES)  # type: ignore[arg-type]
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    holder: HolderDep,
    admission: AdmissionDep,
    settings: SettingsDep,
) -> Any:
    """OpenAI chat completion: the messages rendered by the model's chat template."""
    constraint = request_constraint(body.structured_outputs, body.response_format)
    lease = await lease_model(holder, request, body.model, body.user)
    try:
        prompt, template_stop = render_chat(lease.loaded.chat_template, body.messages)
        stop = list(dict.fromkeys([*template_stop, *body.stop]))
        if len(stop) > MAX_STOP_STRINGS:
            room = MAX_STOP_STRINGS - len(template_stop)
            message = f"stop takes at most {room} strings here: the chat template adds {template_stop}"
            raise invalid(message, "stop", request)
        max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_CHAT_MAX_TOKENS, settings.max_tokens)
        params = [_params(body, max_tokens, stop, j) for j in range(body.n)]
    except BaseException:
        lease.release()
        raise
    top = (body.top_logprobs or 0) if body.logprobs else None
    generation = await start_generation(
        request=request,
        holder=holder,
        admission=admission,
        settings=settings,
        lease=lease,
        prompts=[prompt] * body.n,
        params=params,
        logprobs=top,
        prompt_param="messages",
        constraint=constraint,
    )
    meta = {"id": f"chatcmpl-{generation.id}", "created": int(time.time()), "model": generation.model_id}
    headers = generation.headers
    if body.stream:
        chunks = chat_chunks(generation, meta, n=body.n, include_usage=body.include_usage, logprobs=top is not None)
        return sse.EventStream(chunks, keepalive_s=settings.keepalive_s, on_close=generation.close, headers=headers)
    done = await _collect(generation, request)
    response.headers.update(headers)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=c.text),
            logprobs=_chat_logprobs(c.tokens, generation.tokenizer) if top is not None else None,
            finish_reason=c.finish_reason,  # type: ignore[arg-type]
        )
        for i, c in enumerate(done)
    ]
    return ChatCompletion.model_validate({**meta, "choices": choices, "usage": _usage(generation, done, body.n)})


@router.get("/models", response_model=ModelObjectList, response_model_exclude_none=True)
async def list_models(holder: HolderDep) -> ModelObjectList:
    """The registry's models, then the aliases (with `alias_for` and `canary`), as OpenAI model objects."""
    infos = await _list(holder)
    aliases = await holder.read_aliases()
    models = [ModelObject(id=i.model_id, created=_epoch(i.created_at)) for i in infos]
    created = {m.id: m.created for m in models}
    return ModelObjectList(data=models + [_alias_object(a, created.get(a.model, 0)) for a in aliases.values()])


@router.get("/models/{model_id}", response_model=ModelObject, response_model_exclude_none=True)
async def get_model(model_id: str, holder: HolderDep) -> ModelObject:
    """One model or alias, as an OpenAI model object."""
    alias = (await holder.read_aliases()).get(model_id)
    if alias is not None:
        return _alias_object(alias, _epoch((await holder.info(alias.model)).created_at))
    info = await holder.info(model_id)
    return ModelObject(id=info.model_id, created=_epoch(info.created_at))


def _alias_object(alias: Alias, model_created: int) -> ModelObject:
    """An alias as a model object: `created` is when it was last set (production, never set: its model's)."""
    canary = None if alias.canary is None else {"model": alias.canary.model, "weight": alias.canary.weight}
    created = _epoch(alias.updated_at) if alias.updated_at else model_created
    return ModelObject(id=alias.name, created=created, alias_for=alias.model, canary=canary)


# ---------------------------------------------------------------------------- echo


@dataclass
class Echo:
    """A prompt as its echoed choices begin: its text, with logprobs its tokens scored, and its token count."""

    text: str
    logprobs: CompletionLogprobs | None
    tokens: int


async def _echo(
    body: CompletionRequest, request: Request, holder: ModelHolder, admission: Admission, settings: Settings
) -> tuple[Lease, list[Echo]]:
    """Pin the model and read each prompt back: its text (token ids decoded) and, with logprobs, its tokens
    scored by the fp32 forward `textgen eval` runs (app/scoring.py). The caller releases the lease."""
    lease = await lease_model(holder, request, body.model, body.user)
    try:
        tokenizer = lease.loaded.checkpoint.tokenizer
        ids, texts = [], []
        for prompt in body.prompts:
            check_prompt(prompt, settings, request)
            if isinstance(prompt, str):
                ids.append(tokenizer.encode(prompt))  # as written: an empty prompt echoes no token
                texts.append(prompt)
            else:
                ids.append(token_ids(tokenizer, prompt, request))
                texts.append(tokenizer.decode(prompt))
        if body.logprobs is None:
            return lease, [Echo(text, None, len(i)) for text, i in zip(texts, ids, strict=True)]
        scores = await score_prompts(request, lease, admission, settings, ids, body.logprobs)
        echoes = []
        for text, score in zip(texts, scores, strict=True):
            logprobs = CompletionLogprobs(
                tokens=score.pieces, token_logprobs=score.logprobs, top_logprobs=score.top, text_offset=score.offsets
            )
            echoes.append(Echo(text, logprobs, len(score.ids)))
        return lease, echoes
    except BaseException:
        lease.release()
        raise


def _echo_only(
    body: CompletionRequest,
    echoes: list[Echo],
    model_id: str,
    headers: dict[str, str],
    response: Response,
    settings: Settings,
) -> Any:
    """max_tokens 0: each prompt echoed as its choices' whole text, finished by "length"; no engine involved."""
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id}
    prompt_tokens = sum(echo.tokens for echo in echoes)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens)
    indexed = [(i * body.n + j, echo) for i, echo in enumerate(echoes) for j in range(body.n)]
    if body.stream:
        logprobs = body.logprobs is not None
        chunks = [_text_chunk(meta, i, echo.text, echo.logprobs, None, body.include_usage) for i, echo in indexed]
        for i, _ in indexed:
            chunks.append(_text_chunk(meta, i, "", _no_logprobs() if logprobs else None, "length", body.include_usage))
        if body.include_usage:
            chunks.append(
                sse.event(None, {**meta, "object": "text_completion", "choices": [], "usage": usage.model_dump()})
            )
        return sse.EventStream(_then(chunks + [DONE]), keepalive_s=settings.keepalive_s, headers=headers)
    response.headers.update(headers)
    choices = [
        CompletionChoice(index=i, text=echo.text, logprobs=echo.logprobs, finish_reason="length") for i, echo in indexed
    ]
    return Completion.model_validate({**meta, "choices": choices, "usage": usage})


def _joined(first: CompletionLogprobs | None, then: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return then
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def _no_logprobs() -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])


def _text_chunk(
    meta: dict[str, Any],
    index: int,
    text: str,
    logprobs: CompletionLogprobs | None,
    finish_reason: str | None,
    include_usage: bool,
) -> bytes:
    choice = {
        "index": index,
        "text": text,
        "logprobs": logprobs and logprobs.model_dump(),
        "finish_reason": finish_reason,
    }
    body: dict[str, Any] = {**meta, "object": "text_completion", "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return sse.event(None, body)


async def _then(first: list[bytes], rest: AsyncGenerator[bytes] | None = None) -> AsyncIterator[bytes]:
    """`first`, then what `rest` yields (closed with this stream)."""
    for chunk in first:
        yield chunk
    if rest is None:
        return
    try:
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


# ---------------------------------------------------------------------------- helpers


def _params(body: Any, max_tokens: int, stop: list[str], choice: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=tuple(stop),
        seed=None if body.seed is None else body.seed + choice,
        logit_bias=logit_bias_ids(body.logit_bias),
        skip_special_tokens=body.skip_special_tokens,
    )


async def _collect(generation: Generation, request: Request) -> list[SequenceResult]:
    dropped: str | None = "disconnected"  # unless the answer is collected
    try:
        done = await unless_disconnected(request, generation.collect())
        dropped = None
        return done
    finally:
        generation.close(dropped)


async def _list(holder: ModelHolder) -> list[Any]:
    return await asyncio.to_thread(holder.registry.list)


def _usage(generation: Generation, done: list[SequenceResult], n: int) -> Usage:
    """Over all choices; each prompt counted once (choices j of one prompt share it), as OpenAI counts."""
    prompt = sum(len(seq.prompt_ids) for seq in generation.sequences[::n])
    completion = sum(c.usage["completion_tokens"] for c in done)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _epoch(created_at: str) -> int:
    try:
        return int(datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _completion_logprobs(tokens: list[Token], tokenizer: Tokenizer, offset: int = 0) -> CompletionLogprobs:
    pieces = [_piece(tokenizer, t.token_id) for t in tokens if t.token_id is not None]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return CompletionLogprobs(
        tokens=pieces,
        token_logprobs=[t.logprob or 0.0 for t in tokens if t.token_id is not None],
        top_logprobs=[t.top_logprobs or {} for t in tokens if t.token_id is not None],
        text_offset=offsets,
    )


def _chat_logprobs(tokens: list[Token], tokenizer: Tokenizer) -> ChatLogprobs:
    content = []
    for t in tokens:
        if t.token_id is None:
            continue
        piece = _piece(tokenizer, t.token_id)
        top = [
            TopLogprob(token=p, logprob=lp, bytes=list(p.encode("utf-8"))) for p, lp in (t.top_logprobs or {}).items()
        ]
        content.append(
            TokenLogprob(token=piece, logprob=t.logprob or 0.0, bytes=list(piece.encode("utf-8")), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def _error_chunk(message: str, retryable: bool) -> bytes:
    error = {"type": ERROR_TYPES[500], "message": message, "param": None, "code": None, "retryable": retryable}
    error["request_id"] = request_id_var.get()  # the stream runs inside its request: the id is set
    return sse.event(None, {"error": error})


# ---------------------------------------------------------------------------- streams


# (choice index, its text or delta, finish reason, the tokens since its last chunk) -> one choice of a chunk
ChoiceOf = Callable[[int, Any, str | None, list[Token]], dict[str, Any]]


def completion_chunks(
    generation: Generation,
    meta: dict[str, Any],
    *,
    n: int,
    include_usage: bool,
    logprobs: bool,
    echoes: list[Echo] | None = None,
) -> AsyncIterator[bytes]:
    """text_completion chunks: [the echoed prompt per choice], text pieces per choice, a finish chunk per
    choice, [usage], [DONE]."""
    offsets = [len(echoes[i // n].text) if echoes else 0 for i in range(len(generation.sequences))]

    def choice(index: int, text: str, finish_reason: str | None, tokens: list[Token]) -> dict[str, Any]:
        lp = None
        if logprobs:
            lp = _completion_logprobs(tokens, generation.tokenizer, offsets[index]).model_dump()
            offsets[index] += len(text)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    chunks = _chunks(generation, meta, "text_completion", choice, text=str, end="", n=n, include_usage=include_usage)
    if echoes is None:
        return chunks
    first = []
    for i in range(len(generation.sequences)):
        echo = echoes[i // n]
        first.append(_text_chunk(meta, i, echo.text, echo.logprobs if logprobs else None, None, include_usage))
    return _then(first, chunks)


def chat_chunks(
    generation: Generation, meta: dict[str, Any], *, n: int, include_usage: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    """chat.completion.chunk: a role delta, content deltas, a finish delta per choice, [usage], [DONE]."""

    def choice(index: int, delta: dict[str, str], finish_reason: str | None, tokens: list[Token]) -> dict[str, Any]:
        lp = _chat_logprobs(tokens, generation.tokenizer).model_dump() if logprobs else None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}

    return _chunks(
        generation,
        meta,
        "chat.completion.chunk",
        choice,
        text=lambda text: {"content": text},
        end={},
        first={"role": "assistant", "content": ""},
        n=n,
        include_usage=include_usage,
    )


async def _chunks(
    generation: Generation,
    meta: dict[str, Any],
    obj: str,
    choice: ChoiceOf,
    *,
    text: Callable[[str], Any],
    end: Any,
    n: int,
    include_usage: bool,
    first: Any = None,
) -> AsyncGenerator[bytes]:
    """The stream both OpenAI routes share: a chunk per piece of text as the engine's events come (its
    `text(piece)`), one per finish (`end`), then [usage] and [DONE]; `first` opens each choice."""
    pending: list[list[Token]] = [[] for _ in generation.sequences]  # tokens whose logprobs are not sent yet
    done: list[SequenceResult] = []

    def chunk(index: int, content: Any, finish_reason: str | None) -> bytes:
        tokens, pending[index] = pending[index], []
        body: dict[str, Any] = {**meta, "object": obj, "choices": [choice(index, content, finish_reason, tokens)]}
        if include_usage:
            body["usage"] = None
        return sse.event(None, body)

    try:
        if first is not None:
            for seq in generation.sequences:
                yield chunk(seq.index, first, None)
        async for index, event in generation.events():
            if isinstance(event, Token):
                if event.token_id is not None:
                    pending[index].append(event)  # its logprobs go out with the next chunk
                if event.text:
                    yield chunk(index, text(event.text), None)
            elif isinstance(event, Finished):
                done.append(SequenceResult("", event.finish_reason, event.usage))
                yield chunk(index, end, event.finish_reason)
            elif isinstance(event, Failed):
                yield _error_chunk(event.message, event.retryable)
                return
        if include_usage:
            usage = _usage(generation, done, n).model_dump()
            yield sse.event(None, {**meta, "object": obj, "choices": [], "usage": usage})
        yield DONE
    except Exception:
        log.exception("stream of request %s failed", generation.id)
        yield _error_chunk("the stream failed on the server; it has been logged", True)
