"""Streaming over HTTP, measured by a client in its own process: one stream, then 1-64 concurrent streams.

    python bench/serve_stream.py                       # the shipped default model, default settings
    python bench/serve_stream.py --concurrency 1 8 --requests 2

The server is `textgen serve` in a subprocess with no settings at all (it measures its own decode
step and threads; the plan it chose is printed with the results); this script is the load generator.
Single stream: `POST /generate` with `stream: true`, 2,000 tokens, tokens/s = completion tokens /
(last event - request sent). Concurrency c: c clients in a closed loop, each sending `--requests`
requests one after the other (200-character prompts cut from the corpus, a different one per
request, 500 tokens each); the clients start spread over the first `--ramp` seconds, as users
arrive. Aggregate tokens/s = all completion tokens / wall time of the whole run; time to first token
is per request, from sending to the first token event. Burst: `--burst` requests sent at the same
instant, one each (TTFT p99 of those).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import (  # noqa: E402
    DEFAULT_MODEL,
    Server,
    StreamResult,
    corpus_text,
    models_copy,
    percentile,
    post_stream,
    profile_summary,
    start_profile,
    start_server,
    stop_server,
)
from plots import line_chart  # noqa: E402
from results import figure, machine_summary, write_section  # noqa: E402

PROMPT_CHARS = 200
PROFILE = Path(tempfile.gettempdir()) / "textgen-serve-profile.txt"  # raw py-spy stacks, summarized below


def prompts(n: int, seed: int = 0) -> list[str]:
    text = corpus_text()
    rng = random.Random(seed)
    return [text[i : i + PROMPT_CHARS] for i in (rng.randrange(len(text) - PROMPT_CHARS) for _ in range(n))]


async def single_stream(server: Server, tokens: int, runs: int) -> list[StreamResult]:
    out = []
    for i, prompt in enumerate(prompts(runs, seed=99)):
        body = {"prompt": prompt, "max_tokens": tokens, "stream": True, "seed": i}
        out.append(await post_stream(server.host, server.port, "/generate", body))
    return out


async def concurrent(
    server: Server,
    clients: int,
    requests: int,
    tokens: int,
    ramp: float = 2.0,
    extra: Callable[[int], dict] | None = None,
) -> tuple[list[StreamResult], float]:
    """`extra(i)`: more fields for client i's requests (bench/constrained_load.py constrains some clients)."""
    texts = prompts(clients * requests, seed=clients)

    async def client(i: int) -> list[StreamResult]:
        await asyncio.sleep(ramp * i / clients)  # users arrive over the first `ramp` seconds
        results = []
        for r in range(requests):
            body = {"prompt": texts[i * requests + r], "max_tokens": tokens, "stream": True, "temperature": 0.8}
            if extra is not None:
                body.update(extra(i))
            results.append(await post_stream(server.host, server.port, "/generate", body, record_gaps=True))
        return results

    started = time.perf_counter()
    per_client = await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return [r for rs in per_client for r in rs], wall


def plot(rows: list[dict], path_tput: Path, path_lat: Path) -> None:
    cs = [r["clients"] for r in rows]
    line_chart(
        path_tput,
        cs,
        {"aggregate": [r["aggregate"] for r in rows], "per stream (median)": [r["per_stream"] for r in rows]},
        xlabel="concurrent SSE clients",
        ylabel="tokens/s (client-measured)",
        title="Streaming throughput vs concurrency",
        markers=["o", "s"],
        log2_x=True,
        hlines={"target at 64: 20,000": 20000},
    )
    line_chart(
        path_lat,
        cs,
        {
            "TTFT p50": [r["ttft_p50"] * 1000 for r in rows],
            "TTFT p99": [r["ttft_p99"] * 1000 for r in rows],
            "gap between events p99": [r["gap_p99"] * 1000 for r in rows],
        },
        xlabel="concurrent SSE clients",
        ylabel="ms",
        title="Latency vs concurrency",
        markers=["o", "s", "^"],
        log2_x=True,
        hlines={"target TTFT p99 at 64: 100 ms": 100},
    )


def summarize(clients: int, results: list[StreamResult], wall: float, requests: int = 1) -> dict:
    ok = [r for r in results if r.ok]
    later = [r for i, r in enumerate(results) if r.ok and i % requests]  # each client's 2nd, 3rd... request
    gaps = [g for r in ok for _, g in r.gaps]
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "tokens": sum(r.completion_tokens for r in ok),
        "aggregate": sum(r.completion_tokens for r in ok) / wall,
        "per_stream": statistics.median(r.completion_tokens / (r.ended - r.first_token) for r in ok),
        "ttft_p50": percentile([r.ttft for r in ok], 50),
        "ttft_p99": percentile([r.ttft for r in ok], 99),
        "ttft_p99_later": percentile([r.ttft for r in later], 99) if later else float("nan"),
        "gap_p99": percentile(gaps, 99) if gaps else 0.0,
        "events_per_request": statistics.median(r.events for r in ok),
    }


async def burst(server: Server, n: int, tokens: int) -> list[StreamResult]:
    """n requests sent at the same instant (their prompts all arrive together)."""
    texts = prompts(n, seed=7)
    bodies = [{"prompt": t, "max_tokens": tokens, "stream": True, "temperature": 0.8} for t in texts]
    return list(await asyncio.gather(*(post_stream(server.host, server.port, "/generate", b) for b in bodies)))


async def run_all(server: Server, args: argparse.Namespace) -> tuple[list[StreamResult], list[dict]]:
    await single_stream(server, 200, 1)  # warm-up
    single = await single_stream(server, args.single_tokens, args.single_runs)
    rows = []
    for clients in args.concurrency:
        profile = None
        if args.profile and clients == max(args.concurrency):
            profile = start_profile(server.process.pid, 15, PROFILE)
        cpu = server.cpu_seconds()
        results, wall = await concurrent(server, clients, args.requests, args.tokens, args.ramp)
        cpu = server.cpu_seconds() - cpu
        if profile is not None:
            profile.wait()
        rows.append({**summarize(clients, results, wall, args.requests), "server_cores": cpu / wall})
        print(rows[-1], flush=True)
    if args.burst:
        started = time.perf_counter()
        results = await burst(server, args.burst, args.tokens)
        rows.append({**summarize(args.burst, results, time.perf_counter() - started), "server_cores": 0.0})
        rows[-1]["burst"] = True
        print(rows[-1], flush=True)
    return single, rows


def plan_line(plan: dict | None) -> str:
    """'int8 (C++, vnni up to 8 rows, then onednn), 1 thread(s), measured' from the plan's JSON."""
    if not plan:
        return "not reported"
    product = plan["product"]
    if product == "vnni+onednn":
        product = f"vnni up to {plan['vnni_rows']} rows, then onednn"
    return f"{plan['kind']} ({plan['loops']}, {product}), {plan['threads']} thread(s), {plan['source']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--single-tokens", type=int, default=2000)
    parser.add_argument("--single-runs", type=int, default=3)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the clients start")
    parser.add_argument("--burst", type=int, default=64, help="requests sent at the same instant (0: none)")
    parser.add_argument("--threads", help="pin TEXTGEN_THREADS (default: unset, the server measures)")
    parser.add_argument("--profile", action="store_true", help="py-spy the server at the highest concurrency")
    parser.add_argument("--setting", action="append", default=[], help="extra NAME=VALUE server settings")
    args = parser.parse_args()
    extra = dict(s.split("=", 1) for s in args.setting)
    settings = {"threads": args.threads, **extra}
    server = start_server(models_copy((args.model,)), **settings)
    try:
        single, rows = asyncio.run(run_all(server, args))
        plan = json.loads(server.get(f"/models/{args.model}"))["decode"]
    finally:
        stop_server(server)
    bursts = [r for r in rows if r.get("burst")]
    rows = [r for r in rows if not r.get("burst")]
    (throughput_path, throughput_link), (latency_path, latency_link) = (
        figure("serve_throughput.png"),
        figure("serve_latency.png"),
    )
    plot(rows, throughput_path, latency_path)

    single_rates = [r.completion_tokens / (r.ended - r.started) for r in single if r.ok]
    table = [
        "| clients | requests | failed | aggregate tokens/s | per-stream tokens/s (median) | TTFT p50 | TTFT p99 "
        "| TTFT p99, later requests | event gap p99 | events per request | server CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['aggregate']:,.0f} | {r['per_stream']:,.0f} "
            f"| {r['ttft_p50'] * 1000:.1f} ms | {r['ttft_p99'] * 1000:.1f} ms | {r['ttft_p99_later'] * 1000:.1f} ms "
            f"| {r['gap_p99'] * 1000:.1f} ms | {r['events_per_request']:.0f} | {r['server_cores']:.2f} |"
        )
    top = rows[-1]
    met = top["aggregate"] >= 20000 and top["ttft_p99_later"] <= 0.100
    verdict = (
        f"At {top['clients']} clients: aggregate {top['aggregate']:,.0f} tokens/s against the 20,000 target "
        f"({top['aggregate'] / 20000:.0%}), TTFT p99 of the later requests {top['ttft_p99_later'] * 1000:.0f} ms "
        f"against 100 ms: {'both met' if met else 'missed'}. The server process used {top['server_cores']:.2f} "
        f'cores of {os.cpu_count()} (docs/PERFORMANCE.md, "Results and what bounds them").'
    )
    if bursts:
        b = bursts[0]
        verdict += (
            f"\n\n{b['clients']} requests sent at the same instant: TTFT p50 {b['ttft_p50'] * 1000:.0f} ms, "
            f"p99 **{b['ttft_p99'] * 1000:.0f} ms** (target <= 300 ms), {b['failed']} failed."
        )
    chosen = plan_line(plan)
    profile_text = ""
    if args.profile and PROFILE.exists():
        profile_text = (
            f"py-spy profile of the server during the {max(args.concurrency)}-client run (share of samples; "
            f"functions inclusive):\n\n```\n{profile_summary(PROFILE)}\n```\n"
        )
    command = " ".join(["python bench/serve_stream.py", *sys.argv[1:]])
    settings_text = ", ".join(f"TEXTGEN_{k.upper()}={v}" for k, v in settings.items() if v is not None)
    body = f"""
Machine: {machine_summary()}; load average at the end {Path("/proc/loadavg").read_text().split()[0]}.
Command: `{command}` (model `{args.model}`; server settings: {settings_text or "none"}).
The server's decode step, as it chose it (GET /models/{args.model}, `decode`): {chosen}.

One SSE stream, {args.single_tokens} tokens, client-measured from sending the request to the last
event: **{statistics.median(single_rates):,.0f} tokens/s** (median of {len(single_rates)}:
{", ".join(f"{v:,.0f}" for v in single_rates)}). Target: >= 3,000.

Concurrent SSE streams, {PROMPT_CHARS}-character prompts, {args.tokens} tokens each, {args.requests}
requests per client in a closed loop (targets at 64 clients: aggregate >= 20,000 tokens/s, TTFT p99
of the later requests <= 100 ms):

{chr(10).join(table)}

"TTFT p99, later requests" leaves out each client's first request, which arrives with the ramp-up
burst (all clients within {args.ramp:g} s). "server CPU" is the server process's CPU time over the
run's wall time.

{verdict}

![throughput]({throughput_link}) ![latency]({latency_link})

{profile_text}"""
    write_section("Streaming over HTTP (bench/serve_stream.py)", body)
    print(body)


if __name__ == "__main__":
    main()
