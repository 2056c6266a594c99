"""`textgen serve`: run the app under uvicorn. The CLI calls `serve(host=..., port=..., models_dir=...)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import uvicorn

from app.logging import configure_logging
from app.main import create_app
from app.settings import Settings


def serve(host: str | None = None, port: int | None = None, models_dir: Path | str | None = None) -> None:
    """Serve until interrupted. Arguments override the TEXTGEN_* environment; None keeps it."""
    overrides: dict[str, Any] = {"host": host, "port": port, "models_dir": models_dir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging configured above
        access_log=False,  # app.logging writes one line per request, with its request id
        timeout_graceful_shutdown=5,
    )
