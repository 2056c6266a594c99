"""Bearer-token auth with two scopes.

- "inference" (generation, tokenize, listing models): any key of TEXTGEN_API_KEYS or TEXTGEN_ADMIN_KEYS;
  open when neither is set.
- "admin" (registry changes, later training): a key of TEXTGEN_ADMIN_KEYS; open only when no key
  at all is set. With API keys but no admin keys, the admin routes are closed (403).

Missing or unknown key -> 401, a valid key of the wrong scope -> 403. Keys are compared in
constant time (hmac.compare_digest, against every configured key) and never logged. An accepted
key is known to the rest of the request only by a digest (`request.state.key_id`), which is what
the per-key sequence limit counts by (app/generation.py: `KeyLimits`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from fastapi import Request

from app.errors import ApiError
from app.settings import Settings

log = logging.getLogger(__name__)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, keys: list[str]) -> bool:
    """Constant time in the token's content: every key is compared, no early exit."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def key_id(token: str) -> str:
    """A short digest that names a key without revealing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request) -> None:
    """Dependency of the inference routes."""
    settings = _settings(request)
    if not settings.auth_enabled:
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not (_matches(token, settings.api_keys) | _matches(token, settings.admin_keys)):
        raise _unauthorized("invalid API key")
    request.state.key_id = key_id(token)


async def require_admin_key(request: Request) -> None:
    """Dependency of the routes that change the registry."""
    settings = _settings(request)
    if not settings.auth_enabled:
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing admin key: send 'Authorization: Bearer <key>'")
    if _matches(token, settings.admin_keys):
        return
    if _matches(token, settings.api_keys):
        raise ApiError(403, "this key may generate text but not change models; use an admin key", code="forbidden")
    raise _unauthorized("invalid API key")


def is_admin(request: Request) -> bool:
    """The request carries an admin key (or the server has no keys: everyone may do everything)."""
    settings = _settings(request)
    token = _bearer(request)
    return not settings.auth_enabled or (token is not None and _matches(token, settings.admin_keys))


def may_load(request: Request, model_id: str | None) -> bool:
    """Whether naming `model_id` may load it (TEXTGEN_LOAD_ON_DEMAND): admin keys always; an inference key
    only for the models listed there, or any with `*`. (None names the active model: nothing to load.)"""
    allowed = _settings(request).load_on_demand
    return model_id is None or "*" in allowed or model_id in allowed or is_admin(request)


def warn_if_open(settings: Settings) -> None:
    if not settings.auth_enabled:
        log.warning("no TEXTGEN_API_KEYS or TEXTGEN_ADMIN_KEYS set: the API is open to anyone who can reach it")
    elif not settings.admin_keys:
        log.warning("TEXTGEN_ADMIN_KEYS is not set: the routes that change models are closed")
