"""POST /generate: the native generation route, JSON or Server-Sent Events."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from app import sse
from app.auth import require_api_key
from app.deps import AdmissionDep, HolderDep, SettingsDep
from app.engine import Admission, Failed, Finished, Token
from app.errors import ERROR_TYPES, error_responses, invalid
from app.generation import (
    Generation,
    check_prompt,
    lease_model,
    request_constraint,
    start_generation,
    unless_disconnected,
    version_headers,
)
from app.holder import Lease, ModelHolder
from app.logging import request_id_var
from app.schemas import GenerateRequest, GenerateResponse, PromptLogprob, Usage, logit_bias_ids
from app.scoring import score_prompts
from app.settings import Settings
from lm.sampler import SamplingParams

log = logging.getLogger(__name__)

router = APIRouter(
    tags=["generation"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 500, 503),
)

SSE_RESPONSES = {
    200: {
        "description": "JSON, or with `stream: true` a text/event-stream of `token` events and one `done` event",
        "content": {"text/event-stream": {}},
    }
}


def sampling_params(body: GenerateRequest, settings: Settings) -> SamplingParams:
    # the default of 200 yields to a lower TEXTGEN_MAX_TOKENS; a value the client chose is checked against it
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else min(body.max_tokens, settings.max_tokens)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        stop=tuple(body.stop),
        seed=body.seed,
        logit_bias=logit_bias_ids(body.logit_bias),
        skip_special_tokens=body.skip_special_tokens,
    )


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_unset=True,  # prompt_logprobs only when asked
    responses=SSE_RESPONSES,  # type: ignore[arg-type]
)
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    holder: HolderDep,
    admission: AdmissionDep,
    settings: SettingsDep,
) -> GenerateResponse | sse.EventStream:
    """Continue a prompt; the whole text as JSON, or token by token as SSE with `"stream": true`."""
    constraint = request_constraint(body.structured_outputs)
    if body.max_tokens == 0 and body.prompt_logprobs is None:
        message = "max_tokens 0 asks for no completion: it is only allowed with prompt_logprobs (scoring the prompt)"
        raise invalid(message, "max_tokens", request)
    lease, scored = await _score_prompt(body, request, holder, admission, settings)
    if scored is not None and body.max_tokens == 0:
        assert lease is not None
        lease.release()
        return _prompt_only(body, lease.model_id, version_headers(lease), scored, response, settings)
    generation = await start_generation(
        request=request,
        holder=holder,
        admission=admission,
        settings=settings,
        model=body.model,
        lease=lease,
        prompts=[body.prompt],
        params=[sampling_params(body, settings)],
        constraint=constraint,
    )
    headers = generation.headers
    if body.stream:
        return sse.EventStream(
            native_events(generation, scored),
            keepalive_s=settings.keepalive_s,
            on_close=generation.close,
            headers=headers,
        )
    dropped: str | None = "disconnected"  # unless the answer is collected
    try:
        (result,) = await unless_disconnected(request, generation.collect())
        dropped = None
    finally:
        generation.close(dropped)
    response.headers.update(headers)
    return GenerateResponse(
        id=f"gen-{generation.id}",
        model=generation.model_id,
        text=result.text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        usage=Usage(**result.usage),
        **({"prompt_logprobs": scored} if scored is not None else {}),
    )


async def _score_prompt(
    body: GenerateRequest, request: Request, holder: ModelHolder, admission: Admission, settings: Settings
) -> tuple[Lease | None, list[PromptLogprob] | None]:
    """With prompt_logprobs: pin the model and score the prompt's tokens (app/scoring.py); the caller
    releases the lease. Without: (None, None)."""
    if body.prompt_logprobs is None:
        return None, None
    lease = await lease_model(holder, request, body.model)
    try:
        check_prompt(body.prompt, settings, request)
        ids = lease.loaded.checkpoint.tokenizer.encode(body.prompt)  # as written: an empty prompt has no token
        (score,) = await score_prompts(request, lease, admission, settings, [ids], body.prompt_logprobs)
    except BaseException:
        lease.release()
        raise
    rows = zip(score.ids, score.pieces, score.offsets, score.logprobs, score.top, strict=True)
    return lease, [PromptLogprob(id=i, token=t, offset=o, logprob=lp, top_logprobs=top) for i, t, o, lp, top in rows]


def _prompt_only(
    body: GenerateRequest,
    model_id: str,
    headers: dict[str, str],
    scored: list[PromptLogprob],
    response: Response,
    settings: Settings,
) -> GenerateResponse | sse.EventStream:
    """max_tokens 0: the prompt's scores alone, finished by "length"; no engine involved."""
    usage = Usage(prompt_tokens=len(scored), completion_tokens=0, total_tokens=len(scored))
    if body.stream:
        done = {"finish_reason": "length", "usage": usage.model_dump(), "model": model_id}
        events = [_prompt_event(scored), sse.event("done", done)]
        return sse.EventStream(_replay(events), keepalive_s=settings.keepalive_s, headers=headers)
    response.headers.update(headers)
    return GenerateResponse(
        id=f"gen-{uuid.uuid4().hex[:24]}",
        model=model_id,
        text="",
        finish_reason="length",
        usage=usage,
        prompt_logprobs=scored,
    )


def _prompt_event(scored: list[PromptLogprob]) -> bytes:
    return sse.event("prompt", {"prompt_logprobs": [p.model_dump() for p in scored]})


async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


async def native_events(generation: Generation, scored: list[PromptLogprob] | None = None) -> AsyncIterator[bytes]:
    """[one `prompt` event with the prompt's scores], `token` events with {"text", "index"}, then one `done`,
    or one `error` if generation fails."""
    index = 0
    if scored is not None:
        yield _prompt_event(scored)
    try:
        async for _, event in generation.events():
            if isinstance(event, Token):
                if event.text:
                    yield sse.event("token", {"text": event.text, "index": index})
                    index += 1
            elif isinstance(event, Finished):
                done = {"finish_reason": event.finish_reason, "usage": event.usage, "model": generation.model_id}
                yield sse.event("done", done)
            elif isinstance(event, Failed):
                yield error_event(event.message, retryable=event.retryable)
    except Exception:
        log.exception("stream of request %s failed", generation.id)
        yield error_event("the stream failed on the server; it has been logged", retryable=True)


def error_event(message: str, *, retryable: bool) -> bytes:
    error = {"type": ERROR_TYPES[500], "message": message, "retryable": retryable, "request_id": request_id_var.get()}
    return sse.event("error", {"error": error})
