"""The issue's figures for idle sockets and stalled readers, on a real `textgen serve` at the default timeouts:
300 idle connections and 50 that trickle a header line every 5 s; 200 stalled readers beside a reading client.

docs/RELIABILITY.md ("Idle and slow connections", "Stalled readers") quotes the figures they print
(`pytest tests/e2e/test_connections.py -s`). tests/app/test_connections.py has the quick versions.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.app.conftest import Server, models_template, stop_server  # noqa: F401
from tests.app.test_connections import (
    LONG,
    close_times,
    connect,
    metric,
    request,
    serving,
    stream_lines,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]  # two of the chaos suite's drills (docs/RELIABILITY.md)

DEFAULTS = Settings()
STALLING = {"prompt": "To be", "max_tokens": LONG, "stream": True, "logprobs": 5}  # ~400 bytes a token


class Reader(threading.Thread):
    """A client reading a long stream the whole time: the largest gap between two of its events."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.events = 0
        self.largest_gap = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with ExitStack() as stack:
                last = time.monotonic()
                for line in stream_lines(stack, self.server, {"prompt": "To be", "max_tokens": LONG}):
                    if line.startswith("event:"):
                        now = time.monotonic()
                        self.events += 1
                        self.largest_gap = max(self.largest_gap, now - last)
                        last = now
                    if self.stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001  # reported by the test
            self.error = e


def test_300_idle_and_50_trickling_connections_are_closed_within_the_head_timeout(
    models_template: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    head, idle = DEFAULTS.head_timeout_s, DEFAULTS.idle_timeout_s
    with serving(models_template, tmp_path, max_tokens=str(LONG)) as server:
        reader = Reader(server)
        reader.start()
        kept_alive = [connect(server) for _ in range(20)]  # one request each, then nothing
        for sock in kept_alive:
            sock.sendall(request("/healthz"))
        opened = time.monotonic()
        silent = [connect(server) for _ in range(300)]
        trickling = [connect(server) for _ in range(50)]
        for sock in trickling:
            sock.sendall(b"POST /generate HTTP/1.1\r\n")

        def trickle() -> None:
            for i in range(2):  # a header line every 5 s
                time.sleep(5)
                for sock in trickling:
                    with contextlib.suppress(OSError):  # closed by the server: as it should be
                        sock.sendall(f"X-Line-{i}: x\r\n".encode())

        threading.Thread(target=trickle, daemon=True).start()
        normal: list[int] = []

        def normal_client() -> None:
            while len(normal) < 12:
                normal.append(httpx.post(f"{server.url}/generate", json={"prompt": "x", "max_tokens": 5}).status_code)
                time.sleep(0.5)

        client = threading.Thread(target=normal_client, daemon=True)
        client.start()
        times = close_times(kept_alive + silent + trickling, timeout=max(head, idle) + 3, since=opened)
        client.join(30)
        reader.stop.set()
        reader.join(10)

        assert None not in times, f"{times.count(None)} connections still open"
        last_kept = max(times[: len(kept_alive)])  # type: ignore[type-var]
        last_silent = max(times[len(kept_alive) :])  # type: ignore[type-var]
        assert last_silent <= head + 1, last_silent
        assert last_kept <= idle + 1, last_kept
        assert normal == [200] * 12
        assert reader.error is None and reader.events > 100
        assert reader.largest_gap < 1.0, reader.largest_gap  # a stream that sends is never idle
        print(
            f"\n300 silent + 50 trickling connections: the last closed {last_silent:.2f} s after opening "
            f"(TEXTGEN_HEAD_TIMEOUT_S={head:g}); 20 idle keep-alive connections closed by {last_kept:.2f} s "
            f"(TEXTGEN_IDLE_TIMEOUT_S={idle:g}); meanwhile 12/12 requests answered 200 and a stream got "
            f"{reader.events} events, largest gap {reader.largest_gap * 1000:.0f} ms"
        )


def read_once_served(server: Server) -> tuple[float, int]:
    """A reading client's request, retried after each 429's Retry-After: (seconds until answered, tries)."""
    started, tries = time.monotonic(), 0
    while True:
        tries += 1
        answer = httpx.post(f"{server.url}/generate", json={"prompt": "x", "max_tokens": 20}, timeout=120)
        if answer.status_code == 200:
            return time.monotonic() - started, tries
        assert answer.status_code == 429, answer.text
        time.sleep(float(answer.headers["retry-after"]))


def test_200_stalled_readers_from_one_address_beside_a_reading_client(
    models_template: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The drill's server (32 running + 64 waiting), the default stall timeout and per-client limit."""
    stall = DEFAULTS.stall_timeout_s
    with serving(models_template, tmp_path, max_tokens=str(LONG), max_running="32", max_waiting="64") as server:
        stalled = [connect(server, source="127.0.0.2", rcvbuf=4096) for _ in range(200)]
        for sock in stalled:
            sock.sendall(request("/v1/completions", STALLING))
        assert wait_for(lambda: metric(server, "textgen_running_sequences") == 32, timeout=10) is not None
        assert metric(server, "textgen_waiting_sequences") == 0  # the rest of that address's requests: 429
        took, tries = read_once_served(server)
        assert took <= stall + 2, took
        assert wait_for(lambda: metric(server, "textgen_running_sequences") == 0, timeout=stall + 5) is not None
        assert metric(server, "textgen_generations_dropped_total", reason="stalled") == 32
        print(
            f"\n200 stalled readers from one address: 32 admitted (TEXTGEN_MAX_RUNNING_PER_CLIENT defaults to "
            f"TEXTGEN_MAX_RUNNING), 168 answered 429; a reading client from another address was answered in "
            f"{took:.1f} s ({tries} tries; TEXTGEN_STALL_TIMEOUT_S={stall:g}); all 32 counted as stalled"
        )
        for sock in stalled:
            sock.close()


def test_200_stalled_readers_from_200_addresses_are_cleared_in_rounds_of_the_stall_timeout(
    models_template: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """No per-client limit helps against many addresses: every slot is held, and each stalled stream is cut
    the stall timeout after it filled its buffers; a reading client, retrying on 429, gets in once the
    streams ahead of it in the waiting queue (96 / 32 = 3 rounds) have been cut."""
    stall = 2.0
    with serving(
        models_template, tmp_path, max_tokens=str(LONG), max_running="32", max_waiting="64", stall_timeout_s="2"
    ) as server:
        stalled = [connect(server, source=f"127.0.1.{i}", rcvbuf=4096) for i in range(1, 201)]
        for sock in stalled:
            sock.sendall(request("/v1/completions", STALLING))
        full = lambda: metric(server, "textgen_running_sequences") + metric(server, "textgen_waiting_sequences")  # noqa: E731
        assert wait_for(lambda: full() == 96, timeout=10) is not None
        took, tries = read_once_served(server)
        rounds = math.ceil(96 / 32)
        assert took <= rounds * (stall + 2), took
        assert wait_for(lambda: full() == 0, timeout=rounds * (stall + 2)) is not None
        assert metric(server, "textgen_generations_dropped_total", reason="stalled") == 96
        print(
            f"\n200 stalled readers from 200 addresses: 96 admitted, 104 answered 429; a reading client was "
            f"answered in {took:.1f} s ({tries} tries; stall timeout {stall:g} s, {rounds} rounds); "
            "96 counted as stalled"
        )
        for sock in stalled:
            sock.close()
