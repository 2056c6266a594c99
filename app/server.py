"""`textgen serve`: run the app under uvicorn. The CLI calls `serve(settings)` with its validated settings."""

from __future__ import annotations

import uvicorn

from app.logging import configure_logging
from app.main import create_app
from app.settings import Settings


def serve(settings: Settings) -> None:
    """Serve until interrupted."""
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
