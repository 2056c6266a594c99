"""The rules every request body follows, in one place (docs/API.md, "Input rules").

- Types are strict: `RequestBody`, the base of every request model, refuses a string where a
  number or a boolean belongs (`"max_tokens": "5"`), a boolean where a number belongs
  (`"max_tokens": true`) and a fraction where an integer belongs (`"n": 1.5`). An integer where a
  float belongs stays valid (`"temperature": 1`), as JSON has one number type.
- Text is text: a string field (or a list of strings) holding NUL (U+0000) or a lone surrogate
  (`"\\ud800"`, which JSON can escape but no UTF-8 text can hold) is refused and named, on every
  route. Replacing them would change what the client asked for (a stop string that no longer
  matches, a prompt that is not the one sent); a lone surrogate cannot even be encoded to UTF-8,
  for a byte-level tokenizer or a log line.
- The body is what the route reads: `check_media_type`, an app-wide dependency, answers 415 to a
  body whose Content-Type is not one its route declares (JSON; a form where a route takes
  uploads), or that has none.
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

from fastapi import Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers

from app.errors import ApiError

FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")

Body = TypeVar("Body", bound=BaseModel)


# ---------------------------------------------------------------------------- types and text


def text_fault(value: object) -> str | None:
    """Why `value` (a string, or a list of them) is not text a field takes; None when it is (or is no text)."""
    if isinstance(value, str):
        if value.isascii() and "\x00" not in value:  # the common case, without the scan
            return None
        found = _NOT_TEXT.search(value)
        if found is None:
            return None
        char, at = found.group(), found.start()
        if char == "\x00":
            return f"holds a NUL character (U+0000) at index {at}; text fields refuse NUL, as binary data"
        return f"holds a lone surrogate (U+{ord(char):04X}) at index {at}, which is not a Unicode character"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (fault := text_fault(item)) is not None:
                return f"item {i} {fault}"
    return None


class RequestBody(BaseModel):
    """The base of every request body: strict types, and the text rule on every string field.

    A nested body (a chat message, a content part) derives from it too: the rule checks a field's
    strings and lists of strings, and leaves objects to their own model.
    """

    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _text_is_text(cls, value: object) -> object:
        fault = text_fault(value)
        if fault is not None:
            raise PydanticCustomError("invalid_text", "{fault}", {"fault": fault})
        return value


def parse_json_body(model: type[Body], raw: bytes) -> Body:
    """A body read by the route itself, parsed as FastAPI parses the others (Python's json, so that a
    lone surrogate reaches the text rule and is named), then validated: RequestValidationError if not."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as e:  # not JSON, or not UTF-8
        error = {"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {e}", "input": {}}
        raise RequestValidationError([error]) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


# ---------------------------------------------------------------------------- media types


def media_types(route: APIRoute) -> frozenset[str]:
    """The media types a route's body may have, as the route declares them to FastAPI (and so as the
    OpenAPI schema shows them); empty for a route that takes no body."""
    declared = (route.openapi_extra or {}).get("requestBody", {}).get("content")
    if declared:  # a route that reads the request itself, such as POST /train
        return frozenset(declared)
    if route.body_field is None:
        return frozenset()
    info = route.body_field.field_info
    if isinstance(info, params.Form):  # File is a Form: FastAPI's form parser reads both kinds
        return FORM_TYPES
    return frozenset({getattr(info, "media_type", "application/json")})


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))


async def check_media_type(request: Request) -> None:
    """415 for a body that is not what the route reads (an app-wide dependency: app/main.py)."""
    route = request.scope.get("route")
    accepted = media_types(route) if isinstance(route, APIRoute) else frozenset()
    if not accepted:
        return
    content_type = request.headers.get("content-type")
    media_type = content_type.split(";", 1)[0].strip().lower() if content_type else None
    if media_type in accepted or (media_type is None and not _has_body(request.headers)):
        return
    wanted = " or ".join(sorted(accepted))
    message = f"send the body as {wanted}, with that Content-Type; this one " + (
        f"is {media_type}" if media_type else "has no Content-Type"
    )
    if media_type == "application/x-www-form-urlencoded" and "application/json" in accepted:
        message += " (curl -d sends that: use curl --json, or add -H 'Content-Type: application/json')"
    raise ApiError(415, message, code="unsupported_media_type")
