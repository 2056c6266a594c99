"""The HTTP connections themselves: how long a client may take to send a request head, to come back on a
keep-alive connection, or to accept the bytes of an answer, and how many connections may be open at once.

uvicorn 0.54 (pinned) closes only keep-alive connections that stay idle after a response
(`timeout_keep_alive`); a connection that never sends a whole request head is held forever, and so is
one whose client stops reading (a stalled reader's stream even keeps generating). `GuardedHttpProtocol`
is uvicorn's httptools protocol with the missing bounds, one timer each, and the connection cap:

- a whole request head within `TEXTGEN_HEAD_TIMEOUT_S` of the connection's opening, or of the
  first byte after a response, else the connection is closed (the slowloris defence);
- `TEXTGEN_IDLE_TIMEOUT_S`: uvicorn's own keep-alive timer;
- `TEXTGEN_STALL_TIMEOUT_S`: bytes wait in the transport's buffer (the kernel's send buffer and the
  client's receive window are full) and none has been accepted for this long: the connection is
  aborted, and the request's `EventStream` sees a disconnect marked "stalled" (`stalled()`), which
  frees its sequences. The kernel send buffer is set to `TEXTGEN_SEND_BUFFER_BYTES` (autotuned, it
  grows to 4 MB: a client that never read absorbed 2.6-3.9 MB before `send()` blocked);
- more than `TEXTGEN_MAX_CONNECTIONS` open connections: a request on a new one is answered 503 in the
  service's JSON error shape, where uvicorn's `limit_concurrency` answers plain text and logs twice.

Measured in docs/RELIABILITY.md ("Idle and slow connections", "Stalled readers").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Any, ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import ApiError, error_response
from app.logging import RequestLogMiddleware
from app.metrics import Metrics, RequestMetricsMiddleware
from app.settings import Settings

log = logging.getLogger(__name__)

EXTENSION = "textgen.connection"  # scope["extensions"][EXTENSION] = {"stalled": bool}, one dict per connection


def stalled(scope: Scope) -> bool:
    """Whether this request's connection was aborted because its client stopped accepting bytes."""
    return bool(scope.get("extensions", {}).get(EXTENSION, {}).get("stalled"))


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head timeout, a stall timeout and a JSON 503 above the cap.

    `http_protocol()` makes the class uvicorn runs, with the settings and the 503 app as class attributes.
    """

    settings: ClassVar[Settings]
    over_capacity: ClassVar[RequestLogMiddleware]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.settings.idle_timeout_s  # type: ignore[assignment]  # a float works
        self.connection: dict[object, object] = {"stalled": False}
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._pending = 0  # bytes in the transport's buffer at the last stall check
        self._progress_at = 0.0  # when the buffer last shrank (the client accepted bytes)

    # -- the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if self.settings.send_buffer_bytes and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer_bytes)
        # paused (and so watched for a stall) whenever a byte waits for the client, not from 64 KiB on
        transport.set_write_buffer_limits(high=0)
        self._head_timer = self.loop.call_later(self.settings.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._stall_timer = None
        super().connection_lost(exc)

    def _close(self) -> None:
        """Close now: a transport's close() waits for its buffer to drain, which a stalled client never lets happen."""
        if self.transport.get_write_buffer_size():
            self._reset()
        elif not self.transport.is_closing():
            self.transport.close()

    def _reset(self) -> None:
        """Abort with a reset: a plain abort closes the socket, and the kernel keeps it (orphaned, its send buffer
        full) probing the client's zero window for minutes; SO_LINGER 0 frees it at once."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # -- the request head

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._head_timer = self.loop.call_later(self.settings.head_timeout_s, self._head_timed_out)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {EXTENSION: self.connection}

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.debug(
            "connection from %s: no whole request head in %.1f s; closed", self.client, self.settings.head_timeout_s
        )
        self._close()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if len(self.connections) > self.settings.max_connections:
            app = self.over_capacity
        super()._start_asgi_task(cycle, app)

    # -- the client accepting bytes

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._pending = self.transport.get_write_buffer_size()
            self._progress_at = self.loop.time()
            self._stall_timer = self.loop.call_later(self._stall_period, self._check_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    @property
    def _stall_period(self) -> float:
        return min(0.25, self.settings.stall_timeout_s / 4)  # a stall is seen at most this late

    def _check_stall(self) -> None:
        """Every `_stall_period` while bytes wait: abort once none has been accepted for the stall timeout."""
        self._stall_timer = None
        pending, now = self.transport.get_write_buffer_size(), self.loop.time()
        if pending < self._pending:
            self._progress_at = now
        self._pending = pending
        if now - self._progress_at < self.settings.stall_timeout_s:
            self._stall_timer = self.loop.call_later(self._stall_period, self._check_stall)
            return
        log.debug("connection from %s: no byte accepted in %.1f s; aborted", self.client, now - self._progress_at)
        self.connection["stalled"] = True
        self._reset()


def over_capacity_app(settings: Settings, metrics: Metrics) -> RequestLogMiddleware:
    """The answer to a request on a connection above TEXTGEN_MAX_CONNECTIONS: 503, logged and counted like any."""
    error = ApiError(
        503,
        f"the server has too many open connections (TEXTGEN_MAX_CONNECTIONS={settings.max_connections}); "
        f"retry after {settings.retry_after_s} s",
        code="too_many_connections",
        headers={"Retry-After": str(settings.retry_after_s), "Connection": "close"},
    )

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(error, scope)(scope, receive, send)

    return RequestLogMiddleware(RequestMetricsMiddleware(answer, metrics))


def http_protocol(settings: Settings, metrics: Metrics) -> type[GuardedHttpProtocol]:
    """The protocol class for `uvicorn.run(http=...)`, bound to these settings."""

    class Protocol(GuardedHttpProtocol):
        pass

    Protocol.settings = settings
    Protocol.over_capacity = over_capacity_app(settings, metrics)
    return Protocol
