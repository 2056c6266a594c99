"""Hot swap under load: activate another model version while 32 streams run.

    python bench/hot_swap.py                     # 32 streams of 3,000 tokens, swap after 1 s
    python bench/hot_swap.py --streams 8
    python bench/hot_swap.py --canary 0.1        # production serves a canary at 10% through the swap

The models folder holds the shipped default model and a copy of it under another id; this process
opens `--streams` SSE streams on the active one, waits until every stream has sent tokens, then
`POST /models/<copy>/activate` (load + validate + swap, in the server, while the streams run). It
reports whether every stream finished complete (finish_reason "length", all tokens there), the time
the activation took, and the largest gap between two token events of any stream from the
activation request until 0.5 s after its answer. Targets: no failed or truncated stream; largest
gap <= 100 ms.

With `--canary W`, a third copy (`canary-target`) is production's canary at weight W before the
streams start (requests without a routing key are drawn at random, so about W of the streams run on
it), and the swap is `PUT /models/aliases/production` with the copy as the model and the canary kept:
production's model changes under load while the canary stays in place (docs/API.md, "Aliases").
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
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
    post_json,
    post_stream,
    start_server,
    stop_server,
)
from results import machine_summary, write_section  # noqa: E402

SECOND_ID = "swap-target"
CANARY_ID = "canary-target"


async def run(
    server: Server, streams: int, tokens: int, model: str, canary: float | None
) -> tuple[list[StreamResult], float, float, int, str]:
    text = corpus_text()
    if canary is not None:
        split = {"model": model, "canary": {"model": CANARY_ID, "weight": canary}}
        status, answer = await post_json(server.host, server.port, "/models/aliases/production", split, "PUT")
        assert status == 200, answer
    bodies = [
        {"prompt": text[i * 997 : i * 997 + 200], "max_tokens": tokens, "stream": True, "seed": i}
        for i in range(streams)
    ]
    tasks = [
        asyncio.create_task(post_stream(server.host, server.port, "/generate", body, record_gaps=True))
        for body in bodies
    ]
    await asyncio.sleep(1.0)
    swap_start = time.perf_counter()
    if canary is None:
        status, _ = await post_json(server.host, server.port, f"/models/{SECOND_ID}/activate", {})
    else:
        swap = {"model": SECOND_ID, "canary": {"model": CANARY_ID, "weight": canary}, "expected_model": model}
        status, _ = await post_json(server.host, server.port, "/models/aliases/production", swap, "PUT")
    swap_end = time.perf_counter()
    results = await asyncio.gather(*tasks)
    _, after = await post_json(server.host, server.port, "/generate", {"prompt": "x", "max_tokens": 1})
    return results, swap_start, swap_end, status, after.get("model", "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--threads", help="pin TEXTGEN_THREADS (default: unset, the server measures)")
    parser.add_argument("--canary", type=float, help="production's canary weight through the swap (default: none)")
    args = parser.parse_args()
    models = models_copy((args.model,))
    for copy in (SECOND_ID, CANARY_ID) if args.canary is not None else (SECOND_ID,):
        shutil.copytree(models / args.model, models / copy)
        config = models / copy / "config.json"
        config.write_text(config.read_text().replace(f'"{args.model}"', f'"{copy}"'))
    # with a canary, the swap has three versions loaded at once: the old model (its streams run on), the
    # new one and the canary; TEXTGEN_MAX_LOADED_MODELS (2) would answer the swap 503 models_busy
    loaded = "3" if args.canary is not None else None
    server = start_server(
        models, threads=args.threads, max_running="64", max_tokens=str(args.tokens), max_loaded_models=loaded
    )
    try:
        results, swap_start, swap_end, status, serving = asyncio.run(
            run(server, args.streams, args.tokens, args.model, args.canary)
        )
    finally:
        stop_server(server)
    window = (swap_start, swap_end + 0.5)
    gaps = [g for r in results for t, g in r.gaps if window[0] <= t <= window[1]]
    all_gaps = [g for r in results for _, g in r.gaps]
    complete = [r for r in results if r.ok and r.finish_reason == "length" and r.completion_tokens == args.tokens]
    truncated = [r for r in results if r.ok and r not in complete]
    failed = [r for r in results if not r.ok]
    failures = " (" + "; ".join(str(r.error) for r in failed[:3]) + ")" if failed else ""
    swap_gap = f"{max(gaps) * 1000:.1f} ms" if gaps else "no gaps (no stream was running)"
    canary_flag = f" --canary {args.canary:g}" if args.canary is not None else ""
    canary_text = (
        f", production with `{CANARY_ID}` (a third copy) as its canary at weight {args.canary:g} throughout"
        if args.canary is not None
        else ""
    )
    swap_call = (
        f"`PUT /models/aliases/production` (model `{SECOND_ID}`, the canary kept)"
        if args.canary is not None
        else f"`POST /models/{SECOND_ID}/activate`"
    )
    body = f"""
Machine: {machine_summary()}; load average at the end {Path("/proc/loadavg").read_text().split()[0]}.
Command: `python bench/hot_swap.py --streams {args.streams} --tokens {args.tokens}{canary_flag}` (model
`{args.model}` and a copy of it as `{SECOND_ID}`, TEXTGEN_THREADS={args.threads or "unset (measured)"},
TEXTGEN_MAX_RUNNING=64{", TEXTGEN_MAX_LOADED_MODELS=3" if loaded else ""}).

{args.streams} SSE streams of {args.tokens} tokens{canary_text}; after 1 s, {swap_call} answered
{status} in {(swap_end - swap_start) * 1000:.0f} ms (load, validate, swap); a request after the streams
was served by `{serving}`.

- complete streams: **{len(complete)} / {len(results)}**; truncated: {len(truncated)}; failed: {len(failed)}{failures}
- largest gap between two token events of any stream, from the activation request to 0.5 s after
  its answer: **{swap_gap}** ({len(gaps)} gaps, p99 {percentile(gaps, 99) * 1000:.1f} ms); over the
  whole run: largest {max(all_gaps) * 1000:.1f} ms, p99 {percentile(all_gaps, 99) * 1000:.1f} ms.
  Target: <= 100 ms. Events are coalesced every 20 ms (TEXTGEN_STREAM_INTERVAL_MS), so 20 ms is the
  floor of a gap.
"""
    title = "Hot swap under 32 streams (bench/hot_swap.py)"
    if args.canary is not None:
        title = "Hot swap under 32 streams, with a canary (bench/hot_swap.py --canary)"
    write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
