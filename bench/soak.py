"""Soak: thousands of mixed requests against one `textgen serve`, with clients that misbehave.

2,000 requests at 64 concurrency after a warm-up: half streamed, half JSON (native and /v1); 20% of
the streamed clients leave mid-stream, 5% of all clients are slow readers that read one event a
second. Checked at the end: no unexpected error (every answer a 200, or a stream the client itself
cut short), running and waiting sequences back to 0, and the server's resident memory within 10%
of its level after the warm-up. Results go to bench/RESULTS.md ("Soak").

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py [--requests 2000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

from loadgen import Server, models_copy, post_json, post_stream, start_server, stop_server
from results import machine_summary, write_section

PROMPTS = ["ROMEO:", "To be, or not", "KING HENRY:\nWhat", "The ", "First Citizen:\nWe are"]
SLOW_EVENTS = 5  # a slow reader takes this many events, one a second, then leaves


@dataclass
class Outcome:
    kind: str  # json | v1 | stream | leaver | slow
    ok: bool
    detail: str = ""


async def slow_reader(server: Server, body: dict) -> Outcome:
    """Reads one event a second from a long stream (a 4 KB client buffer: TCP pushes back), then disconnects."""
    payload = json.dumps({**body, "stream": True}).encode()
    reader, writer = await asyncio.open_connection(server.host, server.port, limit=4096)
    try:
        writer.write(
            f"POST /generate HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        status = int((await reader.readline()).split()[1])
        if status != 200:
            return Outcome("slow", False, f"status {status}")
        for _ in range(SLOW_EVENTS):
            await reader.readuntil(b"\n\n")
            await asyncio.sleep(1.0)
        return Outcome("slow", True)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        return Outcome("slow", False, repr(e))
    finally:
        writer.close()


async def one(server: Server, rng: random.Random) -> Outcome:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(16, 64), "temperature": 0.8}
    roll = rng.random()
    if roll < 0.05:
        return await slow_reader(server, {**body, "max_tokens": 2048})  # far more than it reads
    if roll < 0.5:
        status, answer = await post_json(server.host, server.port, "/generate", body)
        return Outcome("json", status == 200, "" if status == 200 else str(answer)[:200])
    if roll < 0.55:
        status, answer = await post_json(server.host, server.port, "/v1/completions", body)
        return Outcome("v1", status == 200, "" if status == 200 else str(answer)[:200])
    leaves = rng.random() < 0.2
    stop_after = rng.randint(1, 4) if leaves else None
    result = await post_stream(server.host, server.port, "/generate", {**body, "stream": True}, stop_after=stop_after)
    if leaves:
        return Outcome("leaver", result.status == 200 and result.error is None, result.error or "")
    return Outcome("stream", result.ok, result.error or f"status {result.status}")


async def run(server: Server, requests: int, concurrency: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []

    async def client() -> None:
        while not queue.empty():
            queue.get_nowait()
            outcomes.append(await one(server, rng))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


def gauge(server: Server, name: str) -> float:
    for line in server.get("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"no metric {name}")


def settle(server: Server, timeout: float = 30.0) -> tuple[float, float]:
    """Running and waiting sequences, once both are 0 (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        running, waiting = gauge(server, "textgen_running_sequences"), gauge(server, "textgen_waiting_sequences")
        if (running == 0 and waiting == 0) or time.monotonic() > deadline:
            return running, waiting
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--threads", help="pin TEXTGEN_THREADS (default: unset, the server measures)")
    parser.add_argument("--no-write", action="store_true", help="print, do not rewrite bench/RESULTS.md")
    args = parser.parse_args()

    server = start_server(models_copy(), threads=args.threads)
    try:
        asyncio.run(run(server, args.warmup, args.concurrency, seed=1))
        settle(server)
        rss_warm = server.rss_bytes()
        started = time.perf_counter()
        outcomes = asyncio.run(run(server, args.requests, args.concurrency, seed=2))
        wall = time.perf_counter() - started
        running, waiting = settle(server)
        rss_end = server.rss_bytes()
        dropped = gauge(server, 'textgen_generations_dropped_total{reason="disconnected"}')
    finally:
        stop_server(server)

    kinds = Counter(o.kind for o in outcomes)
    failures = [o for o in outcomes if not o.ok]
    growth = (rss_end - rss_warm) / rss_warm
    verdict = "pass" if not failures and running == 0 and waiting == 0 and abs(growth) <= 0.10 else "FAIL"
    lines = [
        f"Machine: {machine_summary()}; server: `textgen serve`, shipped `shakespeare-char`, "
        f"{args.threads or 'measured'} torch thread(s), default limits.",
        "",
        f"{args.requests} requests at {args.concurrency} concurrency after {args.warmup} warm-up requests, "
        f"in {wall:.1f} s ({args.requests / wall:.1f} requests/s). Verdict: **{verdict}**.",
        "",
        "| clients | count | failed |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {kinds[k]} | {sum(1 for o in failures if o.kind == k)} |" for k in sorted(kinds)],
        "",
        "json: POST /generate; v1: POST /v1/completions; stream: streamed to the end; leaver: leaves after "
        f"1-4 events; slow: reads one event a second for {SLOW_EVENTS} s, then leaves.",
        "",
        "| check | value |",
        "| --- | --- |",
        f"| unexpected errors | {len(failures)} |",
        f"| running / waiting sequences at the end | {running:.0f} / {waiting:.0f} |",
        f"| generations dropped for a disconnect (server's count) | {dropped:.0f} |",
        f"| resident memory after warm-up -> at the end | {rss_warm / 2**20:.1f} MiB -> {rss_end / 2**20:.1f} MiB "
        f"({growth:+.1%}; limit +-10%) |",
    ]
    if failures:
        lines += ["", "First failures:", *[f"- {o.kind}: {o.detail}" for o in failures[:5]]]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Soak (bench/soak.py)", body)
    if verdict != "pass":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
