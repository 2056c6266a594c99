"""Startup: from `textgen serve` to a ready `/readyz`, with the decode measurement and then from its cache.

    python bench/startup.py                  # 3 cold starts (an empty measurement cache), 3 warm ones

Each start is a new server process on the shipped default model with no settings but the cache folder
(TEXTGEN_TUNE_CACHE_DIR): cold starts get an empty folder, so the engine measures its decode step
(lm/decode/tune.py); warm starts share one folder that an earlier start filled. Time from launching
the process to the first 200 from /readyz, which answers 200 only once the engine's step is chosen.
Targets: cold < 10 s, warm < 3 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import DEFAULT_MODEL, models_copy, start_server, stop_server  # noqa: E402
from results import machine_summary, write_section  # noqa: E402


def start(cache: Path, model: str) -> tuple[float, dict]:
    """Seconds from launch to ready, and the decode plan the server reports."""
    started = time.perf_counter()
    server = start_server(models_copy((model,)), tune_cache_dir=str(cache))  # returns once /readyz is 200
    ready = time.perf_counter() - started
    try:
        plan = json.loads(server.get(f"/models/{model}"))["decode"]
    finally:
        stop_server(server)
    return ready, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cold, warm, sources = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            seconds, plan = start(Path(tmp) / f"cold-{i}", args.model)
            cold.append(seconds)
            sources.append(plan["source"])
        shared = Path(tmp) / "warm"
        start(shared, args.model)  # fills the cache
        for _ in range(args.runs):
            seconds, plan = start(shared, args.model)
            warm.append(seconds)
            sources.append(plan["source"])
    runs = {
        "cold: an empty measurement cache": (cold, sources[: args.runs]),
        "warm: the cache of an earlier start": (warm, sources[args.runs :]),
    }
    rows = [
        f"| {name} | **{statistics.median(t):.2f} s** | {', '.join(f'{v:.2f}' for v in t)} | {', '.join(came)} |"
        for name, (t, came) in runs.items()
    ]
    body = f"""
Machine: {machine_summary()}.
Command: `python bench/startup.py --runs {args.runs}` (model `{args.model}`).

From launching `textgen serve` to /readyz answering 200 (the engine has chosen its decode step):

| start | median | all runs | the plan came from |
| --- | --- | --- | --- |
{chr(10).join(rows)}

Targets: cold < 10 s, warm < 3 s. The cold measurement itself took {plan_seconds(cold, warm)}.
"""
    write_section("Startup (bench/startup.py)", body)
    print(body)


def plan_seconds(cold: list[float], warm: list[float]) -> str:
    """The measurement's share of a cold start: the median difference between cold and warm starts."""
    return f"about {statistics.median(cold) - statistics.median(warm):.1f} s (cold median less warm median)"


if __name__ == "__main__":
    main()
