"""The playground: `GET /` serves one page (app/static) that drives the whole service from a browser.

Everything the page needs ships in the package (no CDN, no build step). The page reads the few
facts it cannot get from the API itself (whether keys are configured, the limits, the training
defaults and bounds, the shipped corpora) from `GET /ui/config`, which is open like /healthz:
it says nothing a 401 or a 422 would not say.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

import lm
from app.deps import SettingsDep
from app.errors import ApiError, error_responses
from app.settings import Settings
from lm.sampler import MAX_STOP_STRINGS
from lm.train import BOUNDS, TOKENIZERS, TrainConfig

router = APIRouter(tags=["playground"], responses=error_responses(404, 500))

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Strict: no inline scripts, styles or event handlers, nothing from another origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release must never run against a stale script
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


class TrainingForm(BaseModel):
    defaults: dict[str, Any] = Field(description="TrainConfig's defaults: what an omitted field means")
    bounds: dict[str, tuple[float, float]] = Field(description="inclusive bounds of the numeric fields")
    tokenizers: list[str]


class PlaygroundConfig(BaseModel):
    version: str
    auth: bool = Field(description="keys are configured: the page asks for one")
    limits: dict[str, int]
    training: TrainingForm
    corpora: dict[str, int] = Field(description="shipped corpora (POST /train `corpus`) and their sizes in bytes")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _file(STATIC_DIR / "index.html")


@router.get("/static/{path:path}", include_in_schema=False)
async def static_file(path: str) -> FileResponse:
    file = (STATIC_DIR / path).resolve()
    if not file.is_relative_to(STATIC_DIR) or not file.is_file() or file.suffix not in MEDIA_TYPES:
        raise ApiError(404, f"no static file {path!r}", code="not_found")
    return _file(file)


@router.get("/ui/config", response_model=PlaygroundConfig)
async def playground_config(settings: SettingsDep) -> PlaygroundConfig:
    """What the playground page needs to build its forms: auth on or off, limits, training defaults."""
    return PlaygroundConfig(
        version=lm.__version__,
        auth=settings.auth_enabled,
        limits={
            "max_tokens": settings.max_tokens,
            "max_prompt_chars": settings.max_prompt_chars,
            "max_stop_strings": MAX_STOP_STRINGS,
            "max_corpus_bytes": settings.max_corpus_bytes,
            "max_train_parameters": settings.max_train_parameters,
        },
        training=TrainingForm(defaults=_form_defaults(), bounds=BOUNDS, tokenizers=list(TOKENIZERS)),
        corpora=await asyncio.to_thread(shipped_corpora, settings),
    )


def shipped_corpora(settings: Settings) -> dict[str, int]:
    """data/<name>/<name>.txt for each shipped corpus, by name."""
    data_dir = settings.data_dir
    if not data_dir.is_dir():
        return {}
    files = (folder / f"{folder.name}.txt" for folder in sorted(data_dir.iterdir()))
    return {f.stem: f.stat().st_size for f in files if f.is_file()}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


def _form_defaults() -> dict[str, Any]:
    """TrainConfig's defaults for the form. The sizes are null (fitted to the corpus, lm/train/sizing.py): a
    number field shows none; `tie_weights`, a checkbox, shows unchecked (sent only when ticked)."""
    defaults = TrainConfig().to_dict()
    defaults["tie_weights"] = bool(defaults["tie_weights"])
    return defaults
