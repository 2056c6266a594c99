"""Every error the service answers is JSON: {"error": {"type", "message", "param", "code", "request_id"}}.

That is OpenAI's error shape (plus the request id, also sent in `X-Request-ID` and written on every
log line of the request), so one shape serves both the native routes and /v1. The one
difference: a request that fails validation is 422 on the native routes (FastAPI's convention)
and 400 on /v1 (OpenAI's). A user's mistake is never a 500; an unexpected failure is logged
once, with its traceback, and answered with a generic 500.

A message is written for the client: server paths, addresses and exception text go to the log
only (a domain error's `detail`). `error_response` checks every message against the server's own
paths and Redis address as a last guard, and logs it if it ever has to redact one.

The disk's faults are the server's, not the client's: no space is 507 `insufficient_storage`
(with `Retry-After`), a read-only or unwritable models folder 503 `storage_read_only` or
`storage_permission_denied`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logging import REQUEST_ID_KEY, request_id_var
from jobs.errors import StoreUnavailable
from lm.errors import (
    ActiveModelError,
    AliasNotFound,
    CheckpointError,
    ConfigError,
    InvalidModelId,
    ModelNotFound,
    PromotionConflict,
    TextgenError,
)

log = logging.getLogger(__name__)

# status -> error type; the names follow OpenAI's where OpenAI has one
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}
RETRYABLE = frozenset({429, 500, 503, 507})
# when each error status happens, for the OpenAPI schema (`error_responses`)
WHEN = {
    400: "a body that is not valid JSON, or (on /v1) a request that fails validation",
    401: "no API key, or an unknown one (only when keys are configured)",
    403: "a valid key without the admin scope, or one that may not load the model it names",
    404: "no such model, job or route",
    409: "a conflict with the registry's or the job's state",
    413: "a body over its limit",
    415: "a body that is not JSON (POST /train: nor multipart/form-data), or one without a Content-Type",
    422: "a request that fails validation (native routes), or a checkpoint that fails it",
    429: "at capacity, or the key's own limit reached; retry after `Retry-After` seconds",
    500: "a bug on the server; logged with the request id",
    503: "no model loaded yet, Redis unreachable, or the models folder not writable; retry later",
    507: "no space left on the server's disk",
}
STORAGE_RETRY_AFTER_S = 60  # a full disk is freed by a person, not in a second


class ErrorDetail(BaseModel):
    type: str = Field(description="the kind of error, OpenAI's names: " + ", ".join(sorted(set(ERROR_TYPES.values()))))
    message: str = Field(description="what went wrong, for a person")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="a stable machine-readable code, when there is one")
    request_id: str | None = Field(description="the request's id, as in the X-Request-ID header and the logs")


class ErrorResponse(BaseModel):
    """Every error answer's body."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: each status with the error body and when it happens."""
    return {status: {"model": ErrorResponse, "description": WHEN[status]} for status in statuses}


class ApiError(Exception):
    """An expected failure with its status; raised anywhere in app/ and answered by `api_error_handler`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error = {"type": self.type, "message": self.message, "param": self.param, "code": self.code}
        return {"error": {**error, "request_id": request_id}}


def is_openai_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def invalid(message: str, param: str | None, request: Request | None = None) -> ApiError:
    """A user's bad input: 400 on /v1, 422 elsewhere."""
    status = 400 if request is not None and is_openai_route(request) else 422
    return ApiError(status, message, param=param, code="invalid_value")


def storage_error(exc: OSError, outcome: str = "nothing was changed") -> ApiError | None:
    """A fault of the server's disk as its answer, saying what became of the request (`outcome`);
    None for any other OSError, which is a bug."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(
            507,
            f"no space left on the server's disk; {outcome}. Retry once space is freed",
            code="insufficient_storage",
            headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
        )
    if exc.errno == errno.EROFS:
        return ApiError(503, f"the server's models folder is read-only; {outcome}", code="storage_read_only")
    if exc.errno in (errno.EACCES, errno.EPERM):
        message = f"the server may not write to its models folder; {outcome}"
        return ApiError(503, message, code="storage_permission_denied")
    return None


def from_domain_error(exc: TextgenError, request: Request | None = None) -> ApiError:
    """Map an lm/ or jobs/ error onto a status. ModelNotFound and InvalidModelId are both "no such model"."""
    if exc.detail:  # the path or address behind the message: for the operator, in the log only
        log.warning("%s: %s (%s)", type(exc).__name__, exc, exc.detail)
    if isinstance(exc, ModelNotFound | InvalidModelId):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, AliasNotFound):
        return ApiError(404, str(exc), param="alias", code="alias_not_found")
    if isinstance(exc, ConfigError):
        return invalid(str(exc), exc.param, request)
    if isinstance(exc, ActiveModelError | PromotionConflict):
        return ApiError(409, str(exc))
    if isinstance(exc, CheckpointError):
        return ApiError(422, f"the checkpoint was refused: {exc}", code="invalid_checkpoint")
    if isinstance(exc, StoreUnavailable):  # Redis is down: generation on the loaded model is not affected
        return ApiError(503, str(exc), code="store_unavailable", headers={"Retry-After": "5"})
    return ApiError(400, str(exc))


def error_response(error: ApiError, scope: Scope) -> JSONResponse:
    """The error as a response, with the request's id in its body (and header: a 500 is answered by
    Starlette's outermost middleware, outside RequestLogMiddleware, which adds it to the others)."""
    request_id = scope.get(REQUEST_ID_KEY) or request_id_var.get()
    headers = dict(error.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    body = error.body(request_id)
    body["error"]["message"] = redact(body["error"]["message"], scope)
    return JSONResponse(body, status_code=error.status, headers=headers)


def server_secrets(scope: Scope) -> list[str]:
    """What no answer may name: the server's folders and its Redis address (longest first)."""
    app = scope.get("app")
    settings = getattr(getattr(app, "state", None), "settings", None)
    if settings is None:
        return []
    found = [str(settings.models_dir), str(settings.models_dir.resolve()), str(settings.data_dir)]
    found += [str(settings.tune_cache_dir)]
    if settings.redis_url:
        url = urlsplit(settings.redis_url)
        found += [settings.redis_url] + ([url.netloc.rpartition("@")[2]] if url.netloc else [])
    return sorted({s for s in found if len(s) > 1}, key=len, reverse=True)


def redact(message: str, scope: Scope) -> str:
    """The last guard: a message that names a server path or address gets it replaced (and logged, to be fixed)."""
    for secret in server_secrets(scope):
        if secret in message:
            log.error("an error message named a server path or address; redacted: %s", message)
            message = message.replace(secret, "<server>")
    return message


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc, request.scope)


async def domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TextgenError)
    return error_response(from_domain_error(exc, request), request.scope)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Name the first field at fault: {"param": "temperature", "message": "temperature: ..."}."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(invalid(message, param, request), request.scope)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method, a body over its limit) in our shape."""
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    return error_response(ApiError(exc.status_code, message, headers=dict(exc.headers or {})), request.scope)


async def os_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The disk's faults (full, read-only, not ours to write) as 507/503, logged once; any other OSError is a bug."""
    assert isinstance(exc, OSError)
    error = storage_error(exc)
    if error is None:
        return await unexpected_error_handler(request, exc)
    log.error("%s %s: %s (%s)", request.method, request.url.path, error.message, exc)
    return error_response(error, request.scope)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "the server failed to answer this request; it has been logged"), request.scope)


class UnexpectedErrorMiddleware:
    """A bug's 500, logged once. (Starlette's handler for `Exception` answers from its outermost middleware
    and then re-raises, so uvicorn logged every such failure a second time.) After the response has
    started there is nothing left to answer: the connection is closed, and the failure logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except Exception as exc:
            request = Request(scope)
            if started:
                log.error(
                    "unexpected error on %s %s after the response began", request.method, scope["path"], exc_info=exc
                )
                return
            response = await unexpected_error_handler(request, exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(TextgenError, domain_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(OSError, os_error_handler)
    app.add_middleware(UnexpectedErrorMiddleware)  # the innermost middleware: every route's bug is caught here


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a request body may have, and the sentence a 413 says about it."""

    max_bytes: int
    message: str

    def error(self) -> ApiError:
        return ApiError(413, self.message)


class BodyLimitMiddleware:
    """413 for a request body over its limit, in the JSON error shape.

    The limit is `default` (TEXTGEN_MAX_BODY_BYTES) unless `routes` gives one for the request's
    (method, path): POST /train takes a corpus, limited by TEXTGEN_MAX_CORPUS_BYTES instead. A
    declared Content-Length over the limit is refused before the app runs; a body without one
    is counted as it arrives, so nothing past the limit is ever buffered. (FastAPI's own
    `max_body_size` answers 413 in plain text, replacing even a JSON error body.)
    """

    def __init__(self, app: ASGIApp, default: BodyLimit, routes: Mapping[tuple[str, str], BodyLimit]) -> None:
        self.app = app
        self.default = default
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope["method"], scope["path"]), self.default)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit.max_bytes:
            await error_response(limit.error(), scope)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    # fastapi's HTTPException: its body reader re-raises it to our handler as it is
                    raise HTTPException(413, detail=limit.message)
            return message

        await self.app(scope, counting_receive, send)
