"""`textgen serve`: run the app under uvicorn. The CLI calls `serve(settings)` with its validated settings."""

from __future__ import annotations

import uvicorn

from app.connections import http_protocol
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
        # uvicorn's httptools protocol with textgen's connection bounds (head, keep-alive and stall
        # timeouts, the connection cap: app/connections.py)
        http=http_protocol(settings, app.state.metrics),
        # the client's address is X-Forwarded-For's only behind a trusted proxy (uvicorn would
        # otherwise trust FORWARDED_ALLOW_IPS, 127.0.0.1 by default); the per-client limit counts by it
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=[str(network) for network in settings.trusted_proxies],
        log_config=None,  # keep the logging configured above
        access_log=False,  # app.logging writes one line per request, with its request id
        timeout_graceful_shutdown=5,
    )
