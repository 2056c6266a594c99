"""Prompt-state cache: time to first token of a chat's next turn, with the cache and without it.

    python bench/prompt_cache.py                 # 5 conversations of about 2,000 characters
    python bench/prompt_cache.py --conversations 3

Two servers run side by side (TEXTGEN_PROMPT_CACHE_MB=0 and the default); the load generator (this
process) plays the same conversations on both, alternating, through `/v1/chat/completions` with
streaming. Each conversation is about 1,800 characters of history (lines of the corpus as user and
assistant turns); the measured request is the next turn: the history, the assistant's reply to it
(100 tokens) and a new user message, about 2,000 characters rendered. Time to first token is
client-measured, from sending to the first content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import DEFAULT_MODEL, Server, corpus_text, models_copy, start_server, stop_server  # noqa: E402
from results import machine_summary, write_section  # noqa: E402

HISTORY_CHARS = 1800
FIRST_CONTENT = re.compile(rb'"delta":\{"content":"[^"]')  # a content delta with text (not the role chunk)


def conversation(seed: int) -> tuple[list[dict], str]:
    """About 1,800 characters of alternating turns, and the next user message."""
    lines = [line.strip() for line in corpus_text().splitlines() if len(line.strip()) > 20]
    rng = random.Random(seed)
    start = rng.randrange(len(lines) - 200)
    messages: list[dict] = [{"role": "system", "content": "A scene from a play."}]
    size = 0
    i = start
    while size < HISTORY_CHARS:
        role = "user" if len(messages) % 2 else "assistant"
        messages.append({"role": role, "content": lines[i]})
        size += len(lines[i]) + 12
        i += 1
    if messages[-1]["role"] == "user":
        messages.pop()
    return messages, lines[i + 1]


async def chat_stream(server: Server, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """(time to first content chunk, the reply, prompt tokens) of one streamed chat completion."""
    body = json.dumps(
        {
            "model": DEFAULT_MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 1,
        }
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    raw = b""
    first = None
    reply = []
    prompt_tokens = 0
    while chunk := await reader.read(65536):
        raw += chunk
        if first is None and FIRST_CONTENT.search(raw):
            first = time.perf_counter() - started
    writer.close()
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            data = json.loads(line[6:])
            if data.get("usage"):
                prompt_tokens = data["usage"]["prompt_tokens"]
            for choice in data.get("choices", []):
                reply.append(choice["delta"].get("content") or "")
    assert first is not None, raw[-500:]
    return first, "".join(reply), prompt_tokens


async def next_turn_ttft(server: Server, seed: int) -> tuple[float, int]:
    messages, new_message = conversation(seed)
    _, reply, _ = await chat_stream(server, messages, 100)
    messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": new_message}]
    ttft, _, prompt_tokens = await chat_stream(server, messages, 20)
    return ttft, prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--threads", help="pin TEXTGEN_THREADS (default: unset, the server measures)")
    args = parser.parse_args()
    common = {"threads": args.threads}
    off = start_server(models_copy((args.model,)), prompt_cache_mb="0", **common)
    on = start_server(models_copy((args.model,)), **common)
    times: dict[str, list[float]] = {"off": [], "on": []}
    sizes = []
    try:
        asyncio.run(next_turn_ttft(on, 1000))  # warm-up both
        asyncio.run(next_turn_ttft(off, 1000))
        for seed in range(args.conversations):
            for name, server in (("off", off), ("on", on)):
                ttft, prompt_tokens = asyncio.run(next_turn_ttft(server, seed))
                times[name].append(ttft)
            sizes.append(prompt_tokens)
            print(seed, prompt_tokens, times["off"][-1], times["on"][-1], flush=True)
        metrics = on.get("/metrics")
    finally:
        stop_server(off)
        stop_server(on)
    hits = [line for line in metrics.splitlines() if line.startswith("textgen_prompt_cache_")]
    off_ms, on_ms = statistics.median(times["off"]) * 1000, statistics.median(times["on"]) * 1000
    ratios = [a / b for a, b in zip(times["off"], times["on"], strict=True)]
    rows = "\n".join(
        f"| {i} | {n} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {a / b:.1f}x |"
        for i, (n, a, b) in enumerate(zip(sizes, times["off"], times["on"], strict=True))
    )
    body = f"""
Machine: {machine_summary()}; load average at the end {Path("/proc/loadavg").read_text().split()[0]}.
Command: `python bench/prompt_cache.py --conversations {args.conversations}` (model `{args.model}`,
TEXTGEN_THREADS={args.threads or "unset (measured)"}; one server with TEXTGEN_PROMPT_CACHE_MB=0, one with the default).

Time to first token of a chat's next turn (history + 100-token reply + new message, rendered
prompt length in tokens below), client-measured. Target: >= 10x sooner with the cache.

| conversation | prompt tokens | no cache | cache | speed-up |
| --- | --- | --- | --- | --- |
{rows}

Median: {off_ms:.1f} ms without the cache, {on_ms:.1f} ms with it: **{off_ms / on_ms:.1f}x**
(median of per-conversation ratios {statistics.median(ratios):.1f}x).

The cached server's counters at the end (the warm-up conversation included):

```
{chr(10).join(hits)}
```
"""
    write_section("Prompt-state cache (bench/prompt_cache.py)", body)
    print(body)


if __name__ == "__main__":
    main()
