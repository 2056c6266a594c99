"""Clients that hold what they do not use, through real `textgen serve` processes (app/connections.py):
a connection that never sends a whole request head, a keep-alive connection left idle, a stream whose
client stopped reading, more connections than the cap, and one client address taking every slot.

Timeouts are 1 s here (settings); tests/e2e/test_connections.py runs the issue's figures at the defaults.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pydantic
import pytest

from app.engine import KeyLimits, Overloaded
from app.settings import Settings
from tests.app.conftest import ClientFactory, Server, start_server, stop_server
from tests.app.test_routes import metric_samples

LONG = 1_000_000  # max_tokens of a stream that runs until its client leaves


# ---------------------------------------------------------------------------- helpers (tests/e2e reuses them)


def address(server: Server) -> tuple[str, int]:
    url = urlsplit(server.url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def connect(server: Server, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection from `source` (any 127.x.y.z: each is another client address), nothing sent yet."""
    sock = socket.socket()
    if rcvbuf is not None:  # a small receive window: a client that does not read fills it at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.connect(address(server))
    return sock


def request(path: str, body: dict | None = None, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request as bytes: POST with a JSON body, or GET."""
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", "Host: textgen"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def close_times(socks: list[socket.socket], timeout: float, since: float | None = None) -> list[float | None]:
    """Read (and drop) whatever comes until the server closes each socket (EOF or reset), for at most `timeout` s:
    the seconds from `since` (a time.monotonic(); default now) until each one closed, None for those still open."""
    started = time.monotonic() if since is None else since
    times: list[float | None] = [None] * len(socks)
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_READ, i)
        while None in times and time.monotonic() - started < timeout:
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    closed = sock.recv(65536) == b""
                except OSError:  # reset
                    closed = True
                if closed:
                    selector.unregister(sock)
                    times[key.data] = time.monotonic() - started
    return times


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed or reset the connection, seen from the client's TCP state: nothing is read."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]  # struct tcp_info's first byte, tcpi_state
    return state != 1  # TCP_ESTABLISHED; a FIN makes it CLOSE_WAIT, a reset CLOSE


def wait_closed(socks: list[socket.socket], timeout: float) -> tuple[float, int]:
    """(seconds until the last of `socks` was closed by the server, how many are still open after `timeout`)."""
    times = close_times(socks, timeout)
    return max((t for t in times if t is not None), default=0.0), times.count(None)


def metric(server: Server, name: str, **labels: str) -> float:
    samples = metric_samples(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return samples[(name, tuple(sorted(labels.items())))]


def wait_for(condition, timeout: float) -> float | None:  # type: ignore[no-untyped-def]
    """Seconds until `condition()` held, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def stream_lines(
    stack: ExitStack, server: Server, body: dict, source: str = "127.0.0.1", **headers: str
) -> Iterator[str]:
    """An open SSE stream from `source`, its status checked (200); its lines, read as they come."""
    transport = httpx.HTTPTransport(local_address=source)
    client = stack.enter_context(httpx.Client(base_url=server.url, transport=transport, timeout=30))
    response = stack.enter_context(client.stream("POST", "/generate", json={**body, "stream": True}, headers=headers))
    assert response.status_code == 200, response.read()
    return response.iter_lines()


def post_from(server: Server, source: str, path: str, body: dict, **headers: str) -> httpx.Response:
    with httpx.Client(base_url=server.url, transport=httpx.HTTPTransport(local_address=source), timeout=30) as client:
        return client.post(path, json=body, headers=headers)


# ---------------------------------------------------------------------------- servers


@contextmanager
def serving(models_template: Path, root: Path, **settings: str) -> Iterator[Server]:
    """A real server on a copy of the models, with these settings, stopped at the end."""
    models = root / "models"
    shutil.copytree(models_template, models)
    server = start_server(models, root, **settings)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def guarded(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """1 s to send a request head, 1 s of keep-alive idleness, 1 s stalled: then the connection closes."""
    timeouts = {"head_timeout_s": "1", "idle_timeout_s": "1", "stall_timeout_s": "1", "keepalive_s": "0.2"}
    limits = {"max_tokens": str(LONG), "max_running_per_client": "0"}
    with serving(models_template, tmp_path_factory.mktemp("guarded"), **timeouts, **limits) as server:
        yield server


@pytest.fixture(scope="module")
def capped(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """At most 4 open connections."""
    settings = {"max_connections": "4", "head_timeout_s": "1", "retry_after_s": "2"}
    with serving(models_template, tmp_path_factory.mktemp("capped"), **settings) as server:
        yield server


@pytest.fixture(scope="module")
def per_client(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No keys, 2 sequences per client address, 8 in all; 127.0.0.1 is a trusted proxy."""
    limits = {"max_running": "4", "max_waiting": "4", "max_running_per_client": "2", "max_tokens": str(LONG)}
    settings = {**limits, "trusted_proxies": "127.0.0.1", "keepalive_s": "0.2"}
    with serving(models_template, tmp_path_factory.mktemp("per-client"), **settings) as server:
        yield server


# ---------------------------------------------------------------------------- request heads and idle connections


@pytest.mark.slow
def test_connections_without_a_whole_request_head_are_closed_within_the_head_timeout(guarded: Server) -> None:
    idle = [connect(guarded) for _ in range(20)]
    trickling = [connect(guarded) for _ in range(5)]
    for sock in trickling:
        sock.sendall(b"POST /generate HTTP/1.1\r\n")
    for i in range(3):  # a header line every 0.3 s: the head is never whole
        time.sleep(0.3)
        for sock in trickling:
            sock.sendall(f"X-Line-{i}: x\r\n".encode())
        assert httpx.get(f"{guarded.url}/healthz").status_code == 200  # a normal client meanwhile
    last, still_open = wait_closed(idle + trickling, timeout=3)
    assert still_open == 0
    assert last < 1 + 1  # the head timeout, plus 1 s


@pytest.mark.slow
def test_an_idle_keep_alive_connection_is_closed_and_an_active_stream_is_not(guarded: Server) -> None:
    keep_alive = connect(guarded)
    keep_alive.sendall(request("/healthz"))
    assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200")  # the answer, and the connection stays open
    with ExitStack() as stack:
        lines = stream_lines(stack, guarded, {"prompt": "To be", "max_tokens": LONG})
        started = time.monotonic()
        last, still_open = wait_closed([keep_alive], timeout=3)
        assert still_open == 0 and last < 1 + 1  # the idle timeout, plus 1 s
        tokens = 0
        while time.monotonic() - started < 2.5:  # longer than every timeout: a stream that sends is not idle
            tokens += next(lines) == "event: token"
        assert tokens > 10


# ---------------------------------------------------------------------------- stalled readers


@pytest.mark.slow
def test_a_stream_whose_client_stops_reading_is_cancelled_and_counted(guarded: Server) -> None:
    stalled_before = metric(guarded, "textgen_generations_dropped_total", reason="stalled")
    stalled = connect(guarded, rcvbuf=4096)
    body = {"prompt": "To be", "max_tokens": LONG, "stream": True, "logprobs": 5}  # ~400 bytes a token
    stalled.sendall(request("/v1/completions", body))
    assert wait_for(lambda: metric(guarded, "textgen_running_sequences") == 1, timeout=5) is not None
    # a reading client is served meanwhile
    assert httpx.post(f"{guarded.url}/generate", json={"prompt": "x", "max_tokens": 5}).status_code == 200
    counted = wait_for(
        lambda: metric(guarded, "textgen_generations_dropped_total", reason="stalled") == stalled_before + 1,
        timeout=1 + 5,
    )
    assert counted is not None, "the stalled stream was never cancelled"
    assert metric(guarded, "textgen_running_sequences") == 0  # its slot is free
    assert closed_by_server(stalled)  # and its connection closed, though it never read
    assert "Exception in ASGI application" not in guarded.log() and "without completing" not in guarded.log()


@pytest.mark.slow
def test_a_client_that_never_reads_a_large_json_answer_has_its_connection_closed(guarded: Server) -> None:
    body = {"prompt": "To be", "max_tokens": 2000, "n": 8, "logprobs": 5}  # a JSON answer of several MB
    sock = connect(guarded, rcvbuf=4096)
    sock.sendall(request("/v1/completions", body))
    assert wait_for(lambda: closed_by_server(sock), timeout=30) is not None  # the answer, the stall timeout
    assert metric(guarded, "textgen_running_sequences") == 0


# ---------------------------------------------------------------------------- the connection cap


@pytest.mark.slow
def test_above_the_connection_cap_a_request_gets_503_and_the_cap_frees_itself(capped: Server) -> None:
    held = [connect(capped) for _ in range(4)]
    refused = httpx.get(f"{capped.url}/healthz")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2" and refused.headers["connection"] == "close"
    error = refused.json()["error"]
    assert error["code"] == "too_many_connections" and error["type"] == "service_unavailable"
    assert error["request_id"] == refused.headers["x-request-id"]
    assert "127.0.0.1" not in refused.text
    _, still_open = wait_closed(held, timeout=3)  # the held ones had no request head: closed after 1 s
    assert still_open == 0
    assert httpx.get(f"{capped.url}/healthz").status_code == 200
    assert metric(capped, "textgen_requests_total", route="unmatched", status="503") == 1


# ---------------------------------------------------------------------------- one client, every slot


@pytest.mark.slow
def test_without_keys_one_client_address_cannot_take_every_slot(per_client: Server) -> None:
    long = {"prompt": "To be", "max_tokens": LONG}
    short = {"prompt": "x", "max_tokens": 3}
    with ExitStack() as stack:
        streams = [stream_lines(stack, per_client, long, source="127.0.0.2") for _ in range(2)]
        assert [next(lines) for lines in streams] == ["event: token"] * 2  # (dropping an iterator closes its stream)
        refused = post_from(per_client, "127.0.0.2", "/generate", short)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "client_overloaded" and error["type"] == "rate_limit_error"
        assert "127.0.0" not in refused.text  # the client's own address is not echoed either
        assert post_from(per_client, "127.0.0.2", "/v1/completions", short).status_code == 429
        assert post_from(per_client, "127.0.0.3", "/generate", short).status_code == 200  # another client
    assert wait_for(lambda: metric(per_client, "textgen_running_sequences") == 0, timeout=5) is not None
    assert post_from(per_client, "127.0.0.2", "/generate", short).status_code == 200  # its slots came back


@pytest.mark.slow
def test_x_forwarded_for_names_the_client_only_behind_a_trusted_proxy(per_client: Server) -> None:
    long = {"prompt": "To be", "max_tokens": LONG}
    short = {"prompt": "x", "max_tokens": 3}
    with ExitStack() as stack:
        # 127.0.0.1 is the trusted proxy: each forwarded address is a client of its own
        streams = [stream_lines(stack, per_client, long, **{"X-Forwarded-For": "203.0.113.7"}) for _ in range(2)]
        behind = post_from(per_client, "127.0.0.1", "/generate", short, **{"X-Forwarded-For": "203.0.113.7"})
        assert behind.status_code == 429 and behind.json()["error"]["code"] == "client_overloaded"
        other = post_from(per_client, "127.0.0.1", "/generate", short, **{"X-Forwarded-For": "203.0.113.8"})
        assert other.status_code == 200
        # 127.0.0.4 is not trusted: whatever it forwards, it is one client
        streams += [
            stream_lines(stack, per_client, long, source="127.0.0.4", **{"X-Forwarded-For": forwarded})
            for forwarded in ("198.51.100.1", "198.51.100.2")
        ]
        spoofed = post_from(per_client, "127.0.0.4", "/generate", short, **{"X-Forwarded-For": "198.51.100.3"})
        assert spoofed.status_code == 429 and spoofed.json()["error"]["code"] == "client_overloaded"


@pytest.mark.slow
def test_clients_that_leave_and_come_back_at_once_are_not_refused_at_their_limit(per_client: Server) -> None:
    """Two streams at a time from one address (its limit), each left after its first token and followed at
    once by the next: a disconnect reaches the server a moment after the next request, which waits for it.
    (Without the wait, with an API key's limit of 4 and 4 such clients, 72 of 120 requests were refused.)"""
    host, port = address(per_client)
    body = request("/generate", {"prompt": "To be", "max_tokens": 2000, "stream": True}, {"Connection": "close"})

    async def client(statuses: list[int]) -> None:
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.5", 0))
            writer.write(body)
            statuses.append(int((await reader.readline()).split()[1]))
            if statuses[-1] == 200:
                await reader.readuntil(b"event: token")
            writer.close()  # and at once the next request

    async def both() -> list[int]:
        statuses: list[int] = []
        await asyncio.gather(client(statuses), client(statuses))
        return statuses

    assert asyncio.run(both()) == [200] * 40


@pytest.mark.anyio
async def test_a_request_larger_than_the_client_limit_is_refused_outright(make_client: ClientFactory) -> None:
    client = await make_client(max_running_per_client=1)
    answer = await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2, "n": 2})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "n"
    assert "TEXTGEN_MAX_RUNNING_PER_CLIENT=1" in answer.json()["error"]["message"]
    assert (await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})).status_code == 200


@pytest.mark.anyio
async def test_with_keys_the_limit_is_per_key_not_per_address(make_client: ClientFactory) -> None:
    client = await make_client(api_keys="k1", max_running_per_key=3, max_running_per_client=1)
    answer = await client.post(
        "/v1/completions", json={"prompt": "b", "max_tokens": 2, "n": 2}, headers={"Authorization": "Bearer k1"}
    )
    assert answer.status_code == 200


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert [str(n) for n in Settings(trusted_proxies="10.0.0.0/8, 127.0.0.1").trusted_proxies] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
    ]
    with pytest.raises(pydantic.ValidationError, match="trusted_proxies"):
        Settings(trusted_proxies="proxy.internal")


# ---------------------------------------------------------------------------- a client at its limit, in a closed loop


@pytest.mark.anyio
async def test_a_client_at_its_limit_waits_a_moment_for_a_slot_it_is_leaving() -> None:
    """A client that leaves a stream and at once sends its next request is often seen leaving just after."""
    limits = KeyLimits(1)
    limits.acquire("k", 1)
    asyncio.get_running_loop().call_later(0.05, limits.release, "k", 1)  # its disconnect, processed a moment later
    await limits.acquire_soon("k", 1)
    assert limits.admitted == {"k": 1}
    with pytest.raises(Overloaded):  # nothing comes back: refused after the grace
        await limits.acquire_soon("k", 1, grace_s=0.05)


@pytest.mark.anyio
async def test_the_grace_is_only_a_moment(make_client: ClientFactory) -> None:
    client = await make_client(max_running=1, max_waiting=0, max_tokens=100_000)
    long = asyncio.ensure_future(client.post("/generate", json={"prompt": "a", "max_tokens": 100_000}))
    assert await wait_admitted(client)
    started = time.monotonic()
    refused = await client.post("/generate", json={"prompt": "b", "max_tokens": 3})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "client_overloaded"
    assert time.monotonic() - started < 1.0
    long.cancel()


async def wait_admitted(client: httpx.AsyncClient) -> bool:
    for _ in range(300):
        if client.app.state.admission.admitted:  # type: ignore[attr-defined]
            return True
        await asyncio.sleep(0.01)
    return False
