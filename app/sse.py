"""Server-Sent Events: the framing, the keep-alive pings and the client-disconnect handling, in one place.

The wire format comes from FastAPI's own `fastapi.sse` (`format_sse_event`, `KEEPALIVE_COMMENT`).
Its `EventSourceResponse` route mode does not fit here: a route that yields is always a stream,
while `/generate` and `/v1/*` answer JSON or SSE depending on the request body, and its ping
interval is a module constant rather than a setting. So `EventStream` is a small response class:

- it pulls events from an async iterator in a producer task and writes `: ping` whenever the
  stream has been idle for `keepalive_s` (proxies close silent connections);
- it always listens for `http.disconnect` and stops the stream as soon as the client leaves, or
  stops reading: the server aborts a connection whose client has accepted no bytes for
  `TEXTGEN_STALL_TIMEOUT_S` (app/connections.py), which reaches the stream as a disconnect marked
  "stalled";
- it calls `on_close(dropped)` exactly once, in a `finally`, whatever happened (`dropped` is None
  when the stream ended, else "disconnected" or "stalled"): the route frees the request's sequences
  and model lease there, even if the body was never iterated.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.connections import stalled

log = logging.getLogger(__name__)

OnClose = Callable[[str | None], Awaitable[None] | None]  # why the stream stopped early: None, or a `dropped` reason
_END = object()


def event(name: str | None, data: Any) -> bytes:
    """One SSE event: `event: <name>` and `data: <json>`."""
    return format_sse_event(event=name, data_str=json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def data_line(raw: str) -> bytes:
    """An unnamed event with a raw data payload (OpenAI's `data: [DONE]`)."""
    return format_sse_event(data_str=raw)


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        keepalive_s: float,
        on_close: OnClose | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.keepalive_s = keepalive_s
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        # no caching, and no buffering by nginx-style proxies
        self.headers["Cache-Control"] = "no-cache"
        self.headers["X-Accel-Buffering"] = "no"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False  # the client left, or stopped reading
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:

                async def write_all() -> None:
                    await self._write_all(send)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal disconnected
                    await wait_for_disconnect(receive)
                    disconnected = True
                    tg.cancel_scope.cancel()

                tg.start_soon(write_all)
                tg.start_soon(watch)
            if not disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket went away while writing
            disconnected = True
        finally:
            await self._close(("stalled" if stalled(scope) else "disconnected") if disconnected else None)

    async def _write_all(self, send: Send) -> None:
        """Copy events to the client, inserting a keep-alive comment after each idle `keepalive_s`."""
        pending: asyncio.Queue[object] = asyncio.Queue(maxsize=1)

        async def produce() -> None:
            try:
                async for chunk in self.events:
                    await pending.put(chunk)
            except Exception:  # the event source should send its own error event; close the stream anyway
                log.exception("event stream failed")
            await pending.put(_END)

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_s):  # not wait_for: see app/reconcile.py
                        chunk = await pending.get()
                except TimeoutError:
                    chunk = KEEPALIVE_COMMENT
                if chunk is _END:
                    break
                assert isinstance(chunk, bytes)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _close(self, dropped: str | None) -> None:
        try:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()  # run the source's finally now, not whenever the GC finds it
            if self.on_close is None:
                return
            result = self.on_close(dropped)
            if result is not None:
                await result
        except Exception:
            log.exception("stream cleanup failed")


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone (the one place that reads `http.disconnect`)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
