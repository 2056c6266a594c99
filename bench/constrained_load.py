"""Constrained streams among unconstrained ones: 64 SSE clients, of which 8 send `structured_outputs`.

    python bench/constrained_load.py
    python bench/constrained_load.py --clients 64 --constrained 8 --rounds 2

One `textgen serve` (the shipped default model, no settings), loaded by bench/serve_stream.py's closed-loop
clients (200-character prompts, 500 tokens, 3 requests each, arriving over 2 s). Rounds alternate on the same
server: all clients unconstrained, then `--constrained` of them constrained, and again, so the two are measured
back to back. The constraint is a regex of exactly `--tokens` characters from a class of letters, spaces and
punctuation: on a character model every step of a constrained stream is masked, and every stream runs its
whole length. Aggregate tokens/s counts every client's tokens over the round's wall time. Target: the
mixed rounds within 10% of the unconstrained ones (issue "Output apps can build on").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import DEFAULT_MODEL, Server, models_copy, start_server, stop_server  # noqa: E402
from results import machine_summary, write_section  # noqa: E402
from serve_stream import concurrent, single_stream, summarize  # noqa: E402

CLASS = r"[A-Za-z ,.;:!?'\n-]"  # letters, spaces and the corpus's punctuation


async def rounds(server: Server, args: argparse.Namespace) -> list[dict]:
    constraint = {"structured_outputs": {"regex": f"{CLASS}{{{args.tokens}}}"}}

    def extra(i: int) -> dict:
        return constraint if i < args.constrained else {}

    await single_stream(server, 200, 1)  # warm-up
    await concurrent(server, args.clients, 1, 100, args.ramp, extra)  # compiles and caches the constraint
    rows = []
    for r in range(args.rounds):
        for constrained in (0, args.constrained):
            results, wall = await concurrent(
                server, args.clients, args.requests, args.tokens, args.ramp, extra if constrained else None
            )
            row = {**summarize(args.clients, results, wall, args.requests), "constrained": constrained, "round": r}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--constrained", type=int, default=8, help="clients that send a constraint")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of rounds (unconstrained, mixed)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--ramp", type=float, default=2.0)
    args = parser.parse_args()
    server = start_server(models_copy((args.model,)))
    try:
        rows = asyncio.run(rounds(server, args))
    finally:
        stop_server(server)

    table = [
        "| round | constrained clients | requests | failed | aggregate tokens/s | TTFT p50 | TTFT p99 "
        "| event gap p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['round'] + 1} | {r['constrained']} of {r['clients']} | {r['requests']} | {r['failed']} "
            f"| {r['aggregate']:,.0f} | {r['ttft_p50'] * 1000:.1f} ms | {r['ttft_p99'] * 1000:.1f} ms "
            f"| {r['gap_p99'] * 1000:.1f} ms |"
        )
    plain = statistics.median(r["aggregate"] for r in rows if not r["constrained"])
    mixed = statistics.median(r["aggregate"] for r in rows if r["constrained"])
    ratio = mixed / plain
    command = " ".join(["python bench/constrained_load.py", *sys.argv[1:]])
    body = f"""
Machine: {machine_summary()}.
Command: `{command}` (model `{args.model}`; server settings: none).

{args.clients} SSE clients in a closed loop, {args.requests} requests each, {args.tokens} tokens per request;
in the mixed rounds {args.constrained} of them send `structured_outputs: {{"regex": "{CLASS}{{{args.tokens}}}"}}`
(every step of theirs masked). Rounds alternate on one server.

{chr(10).join(table)}

Median aggregate: unconstrained **{plain:,.0f}** tokens/s, with {args.constrained} constrained **{mixed:,.0f}**
tokens/s: **{ratio:.1%}** of it (target: within 10%, {"met" if ratio >= 0.9 else "missed"}).
"""
    print(body)
    write_section("Constrained streams under load (bench/constrained_load.py)", body)


if __name__ == "__main__":
    main()
