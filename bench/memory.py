"""Memory: the API process's resident memory over 10,000 mixed requests.

    python bench/memory.py                       # 10,000 requests, 32 at a time
    python bench/memory.py --requests 2000

The load generator (this process) sends a repeating mix to `textgen serve`: streamed to the end,
not streamed, and streamed then disconnected after a few events; prompts are different slices of
the corpus (so the prompt-state cache fills up to its budget), 24 tokens each. The server's VmRSS
is read from /proc after the first 100 requests and every 500 after that. Target: after 10,000,
within 10% of the size after the first 100.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import (  # noqa: E402
    DEFAULT_MODEL,
    Server,
    corpus_text,
    models_copy,
    post_json,
    post_stream,
    start_server,
    stop_server,
)
from plots import line_chart  # noqa: E402
from results import figure, machine_summary, write_section  # noqa: E402


async def one(server: Server, i: int, prompt: str, tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8}
    kind = ("stream", "json", "disconnect")[i % 3]
    if kind == "json":
        status, _ = await post_json(server.host, server.port, "/generate", body)
        return "ok" if status == 200 else f"status {status}"
    result = await post_stream(
        server.host, server.port, "/generate", {**body, "stream": True}, stop_after=3 if kind == "disconnect" else None
    )
    return "ok" if result.status == 200 and result.error is None else f"{result.status} {result.error}"


async def run(
    server: Server, total: int, concurrency: int, tokens: int
) -> tuple[list[tuple[int, int]], dict[str, int], float]:
    text = corpus_text()
    rng = random.Random(0)
    samples: list[tuple[int, int]] = []
    outcomes: dict[str, int] = {}
    next_index = 0
    done = 0
    checkpoints = {100, *range(500, total + 1, 500)}

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < total:
            i = next_index
            next_index += 1
            start = rng.randrange(len(text) - 300)
            outcome = await one(server, i, text[start : start + rng.randrange(20, 300)], tokens)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            done += 1
            if done in checkpoints:
                at = done
                await asyncio.sleep(0.2)  # let disconnected sequences leave
                samples.append((at, server.rss_bytes()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, outcomes, time.perf_counter() - started


def plot(samples: list[tuple[int, int]], path: Path) -> None:
    base = samples[0][1] / 2**20
    line_chart(
        path,
        [n for n, _ in samples],
        {"": [b / 2**20 for _, b in samples]},
        xlabel="requests served",
        ylabel="server RSS (MiB)",
        title="API process resident memory",
        markers=".",
        figsize=(6, 3.5),
        hlines={"first 100 + 10%": base * 1.1},
        ylim=(0, base * 1.3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", help="pin TEXTGEN_THREADS (default: unset, the server measures)")
    parser.add_argument("--setting", action="append", default=[], help="extra NAME=VALUE server settings")
    args = parser.parse_args()
    extra = dict(s.split("=", 1) for s in args.setting)
    server = start_server(models_copy((args.model,)), threads=args.threads, **extra)
    try:
        samples, outcomes, wall = asyncio.run(run(server, args.requests, args.concurrency, args.tokens))
        cache_bytes = [line for line in server.get("/metrics").splitlines() if line.startswith("textgen_prompt_cache")]
    finally:
        stop_server(server)
    figure_path, figure_link = figure("memory.png")
    plot(samples, figure_path)
    first, last = samples[0][1], samples[-1][1]
    growth = (last - first) / first * 100
    body = f"""
Machine: {machine_summary()}; load average at the end {Path("/proc/loadavg").read_text().split()[0]}.
Command: `{" ".join(["python bench/memory.py", *sys.argv[1:]])}`
(model `{args.model}`, TEXTGEN_THREADS={args.threads or "unset (measured)"}, {extra or "the rest"} default);
{wall:.0f} s.

Mix: streamed to the end, not streamed, streamed and disconnected after 3 events (a third each),
prompts of 20-300 characters from the corpus, {args.tokens} tokens. Outcomes: {outcomes}.

Server RSS after the first {samples[0][0]} requests: {first / 2**20:.1f} MiB; after {samples[-1][0]}:
{last / 2**20:.1f} MiB: **{growth:+.1f}%** (target: within 10%). Largest sample:
{max(b for _, b in samples) / 2**20:.1f} MiB.

```
{chr(10).join(cache_bytes)}
```

![memory]({figure_link})
"""
    write_section("Memory over 10,000 requests (bench/memory.py)", body)
    print(body)


if __name__ == "__main__":
    main()
