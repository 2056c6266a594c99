"""Shared pieces of the serving benchmarks: start `textgen serve` as its own process, and a lean SSE client.

The load generator is a separate process from the server (the benchmark script itself), and it is
kept cheap: raw asyncio streams and a few bytes comparisons per event, so that on a 2-core machine
the client takes as little CPU from the server as possible. It speaks just enough HTTP/1.1
(one request per connection, chunked or sized bodies).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "shakespeare-char"


# ---------------------------------------------------------------------------- the server process


@dataclass
class Server:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def get(self, path: str) -> str:
        with urlopen(self.url + path, timeout=30) as response:
            return response.read().decode()


def models_copy(model_ids: tuple[str, ...] = (DEFAULT_MODEL,)) -> Path:
    """A temporary models folder with copies of the shipped checkpoints (activation writes its pointer)."""
    target = Path(tempfile.mkdtemp(prefix="textgen-bench-")) / "models"
    target.mkdir()
    source = Path(os.environ.get("TEXTGEN_BENCH_MODELS", ROOT / "models"))  # another folder for dry runs
    for model_id in model_ids:
        shutil.copytree(source / model_id, target / model_id)
    (target / "ACTIVE").write_text(model_ids[0] + "\n")
    return target


def start_server(models_dir: Path, **settings: str | None) -> Server:
    """`textgen serve` on a free port with TEXTGEN_* settings (None: not set, the service's own default);
    returns once /readyz answers 200. Nothing else is set: the server tunes itself as a user's would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    given = {k: v for k, v in settings.items() if v is not None}
    env = {**os.environ, **{f"TEXTGEN_{k.upper()}": str(v) for k, v in given.items()}}
    env.setdefault("TEXTGEN_LOG_LEVEL", "WARNING")
    log_path = models_dir.parent / f"server-{port}.log"
    cmd = [sys.executable, "-m", "textgen", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(models_dir)]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server("127.0.0.1", port, process, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            server.get("/readyz")
            return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise RuntimeError("server not ready after 120 s")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


# ---------------------------------------------------------------------------- the client


@dataclass
class StreamResult:
    started: float
    status: int = 0
    first_token: float | None = None  # perf_counter time of the first token event
    ended: float | None = None
    events: int = 0  # token events (coalesced text counts once)
    completion_tokens: int = 0  # from the done event's usage
    finish_reason: str | None = None
    error: str | None = None
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (time, gap) between token events
    text_chars: int = 0

    @property
    def ttft(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.started

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finish_reason is not None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            return status, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    else:
        yield await reader.readexactly(int(headers.get("content-length", "0")))


def _post_request(host: str, path: str, payload: bytes, method: str = "POST") -> bytes:
    """One HTTP/1.1 request (POST by default) with a JSON body, on a connection that closes after the answer."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


async def post_stream(
    host: str, port: int, path: str, body: dict, *, record_gaps: bool = False, stop_after: int | None = None
) -> StreamResult:
    """POST a streaming generation; parse its SSE events. `stop_after`: disconnect after that many token events."""
    payload = json.dumps(body).encode()
    result = StreamResult(started=time.perf_counter())
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_post_request(host, path, payload))
        result.status, headers = await _read_head(reader)
        buffer = b""
        last = None
        async for chunk in _body_chunks(reader, headers):
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for raw in events:
                if raw.startswith(b"event: token"):
                    t = time.perf_counter()
                    if result.first_token is None:
                        result.first_token = t
                    elif record_gaps and last is not None:
                        result.gaps.append((t, t - last))
                    last = t
                    result.events += 1
                    result.text_chars += len(json.loads(raw.split(b"data: ", 1)[1])["text"])
                    if stop_after is not None and result.events >= stop_after:
                        result.ended = t
                        return result
                elif raw.startswith(b"event: done"):
                    done = json.loads(raw.split(b"data: ", 1)[1])
                    result.completion_tokens = done["usage"]["completion_tokens"]
                    result.finish_reason = done["finish_reason"]
                elif raw.startswith(b"event: error") or result.status != 200:
                    result.error = raw.decode(errors="replace")[:300]
        result.ended = time.perf_counter()
        return result
    except (OSError, asyncio.IncompleteReadError) as e:
        result.error = repr(e)
        return result
    finally:
        writer.close()


async def post_json(host: str, port: int, path: str, body: dict, method: str = "POST") -> tuple[int, dict]:
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_post_request(host, path, payload, method))
        status, headers = await _read_head(reader)
        data = b"".join([chunk async for chunk in _body_chunks(reader, headers)])
        return status, json.loads(data) if data else {}
    finally:
        writer.close()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def corpus_text() -> str:
    return (ROOT / "data" / "shakespeare" / "shakespeare.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- profiles


def start_profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy record of the server process (all threads, folded stacks), or None when py-spy is not installed."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--format", "raw"]
    cmd += ["--threads", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_summary(path: Path, top: int = 14) -> str:
    """Share of samples per thread, then the functions of textgen's own code (app/, lm/) and the
    SSE send path by inclusive share."""
    threads: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1]
        threads[name] = threads.get(name, 0) + n
        for frame in set(frames[1:]):
            if "app/" in frame or "lm/" in frame or "h11_impl" in frame or "base_events.py" in frame:
                function = frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
                inclusive[function] = inclusive.get(function, 0) + n
    lines = [f"{n / total:6.1%}  thread {name}" for name, n in sorted(threads.items(), key=lambda x: -x[1])[:3]]
    lines.append("")
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(inclusive.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(lines)
