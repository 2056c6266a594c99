"""POST /generate: the native generation route, JSON or Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from app import sse
from app.auth import require_api_key
from app.deps import AdmissionDep, HolderDep, SettingsDep
from app.engine import Failed, Finished, Token
from app.errors import ERROR_TYPES, error_responses
from app.generation import Generation, start_generation, unless_disconnected
from app.logging import request_id_var
from app.schemas import GenerateRequest, GenerateResponse, Usage
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
    )


@router.post("/generate", response_model=GenerateResponse, responses=SSE_RESPONSES)  # type: ignore[arg-type]
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    holder: HolderDep,
    admission: AdmissionDep,
    settings: SettingsDep,
) -> GenerateResponse | sse.EventStream:
    """Continue a prompt; the whole text as JSON, or token by token as SSE with `"stream": true`."""
    generation = await start_generation(
        request=request,
        holder=holder,
        admission=admission,
        settings=settings,
        model=body.model,
        prompts=[body.prompt],
        params=[sampling_params(body, settings)],
    )
    headers = {"X-Model-Version": generation.model_id}
    if body.stream:
        return sse.EventStream(
            native_events(generation), keepalive_s=settings.keepalive_s, on_close=generation.close, headers=headers
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
    )


async def native_events(generation: Generation) -> AsyncIterator[bytes]:
    """`token` events with {"text", "index"}, then one `done`, or one `error` if generation fails."""
    index = 0
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
