"""Serving latency under training: one stream's inter-token latency while a job trains on the same machine.

Starts `textgen serve` in embedded mode on a throwaway models folder holding a model of the
default character recipe's shape (2 x 512 LSTM; random weights: latency does not depend on them),
measures the gaps between consecutive token events of single streams as a client sees them
(SSE over HTTP), then submits a training job through POST /train (shipped Shakespeare corpus,
same shape) and measures again while it trains. The worker runs each job in a niced process
with capped torch threads (TEXTGEN_TRAIN_THREADS); the target is p99 under training <= 3x idle.

    python bench/train_interference.py                     # 5 streams x 2000 tokens per phase
    python bench/train_interference.py --streams 3 --tokens 200 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import FilePointer, Registry
from lm.tokenizers import fit_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare" / "shakespeare.txt"
sys.path.insert(0, str(ROOT / "bench"))
from results import machine_summary, write_section  # noqa: E402

TITLE = "Latency under training (bench/train_interference.py)"
MODEL_ID = "serving"


def publish_serving_model(models_dir: Path, hidden: int, layers: int) -> None:
    tokenizer = fit_tokenizer("char", CORPUS.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    cfg = ModelConfig(tokenizer.vocab_size, embedding_dim=hidden, hidden_dim=hidden, layers=layers, dropout=0.0)
    training = {"recipe": {"note": "random weights for the latency benchmark"}, "corpus_sha256": "", "corpus_bytes": 0}
    Registry(models_dir).publish(LSTMLanguageModel(cfg), tokenizer, model_id=MODEL_ID, training=training, metrics={})
    FilePointer(models_dir).compare_and_set(None, MODEL_ID)


def start_server(models_dir: Path, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "textgen", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--models-dir", str(models_dir)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log_path}")


def stream_gaps(url: str, tokens: int, seed: int) -> list[float]:
    """Seconds between consecutive tokens of one stream as the client receives them.

    The service may send several tokens in one `token` event when they are ready together;
    those tokens arrive at once (gap 0) and the first of them carries the wait. The serving
    model is a char model, so an event's token count is the length of its text. The first
    token's wait (time to first token) is excluded.
    """
    body = {"prompt": "ROMEO:", "max_tokens": tokens, "stream": True, "temperature": 1.0, "seed": seed}
    gaps: list[float] = []
    last: float | None = None
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as response:
        response.raise_for_status()
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "token":
                now = time.perf_counter()
                count = len(json.loads(line[6:])["text"])
                if last is not None and count:
                    gaps += [now - last] + [0.0] * (count - 1)
                last = now
    return gaps


def measure(url: str, streams: int, tokens: int) -> tuple[list[float], dict[str, float]]:
    """Client-side gaps, and the engine's own inter-token histogram over the same streams."""
    before = engine_histogram(url)
    gaps: list[float] = []
    for i in range(streams):
        gaps += stream_gaps(url, tokens, seed=i)
    after = engine_histogram(url)
    return gaps, {key: after[key] - before.get(key, 0.0) for key in after}


def engine_histogram(url: str) -> dict[str, float]:
    """textgen_inter_token_latency_seconds from /metrics: {"le=<bound>": count, "sum": s, "count": n}."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if not line.startswith("textgen_inter_token_latency_seconds"):
            continue
        name, value = line.rsplit(" ", 1)
        if "_bucket" in name:
            values["le=" + name.split('le="')[1].split('"')[0]] = float(value)
        elif name.endswith("_sum"):
            values["sum"] = float(value)
        elif name.endswith("_count"):
            values["count"] = float(value)
    return values


def bucket_percentile(histogram: dict[str, float], q: float) -> str:
    """The upper bound of the bucket holding the q-quantile (Prometheus buckets are cumulative)."""
    total = histogram.get("count", 0.0)
    bounds = sorted((float(k[3:]), v) for k, v in histogram.items() if k.startswith("le=") and k != "le=+Inf")
    for bound, cumulative in bounds:
        if total and cumulative >= q * total:
            return f"<= {bound * 1000:g}"
    return "> " + (f"{bounds[-1][0] * 1000:g}" if bounds else "?")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for_training(url: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/train/{job_id}", timeout=10).json()
        if job["progress"] is not None:
            return job
        if job["state"] in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(f"the training job ended early: {job['state']} {job['error']}")
        time.sleep(0.5)
    raise RuntimeError("the training job did not start")


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        publish_serving_model(models_dir, args.hidden, args.layers)
        env = {
            **({"TEXTGEN_THREADS": str(args.serve_threads)} if args.serve_threads else {}),
            "TEXTGEN_TRAIN_THREADS": str(args.train_threads),
            "TEXTGEN_DEVICE": "cpu",
            "TEXTGEN_MAX_TOKENS": str(args.tokens),
            "TEXTGEN_LOG_LEVEL": "WARNING",
            # one event per token: every gap is a real wait. With the default 20 ms coalescing a
            # 400-token stream is a handful of events, and the p99 of mostly-zero gaps is noise.
            "TEXTGEN_STREAM_INTERVAL_MS": "0",
        }
        proc, url = start_server(models_dir, env, Path(tmp) / "server.log")
        try:
            measure(url, 1, 50)  # warm-up
            idle, idle_engine = measure(url, args.streams, args.tokens)
            job = {"corpus": "shakespeare", "embedding_dim": args.hidden, "hidden_dim": args.hidden}
            job |= {"layers": args.layers, "epochs": 1000, "device": "cpu", "activate": False}
            job_id = httpx.post(f"{url}/train", json=job, timeout=60).json()["id"]
            wait_for_training(url, job_id)
            busy, busy_engine = measure(url, args.streams, args.tokens)
            progress = httpx.get(f"{url}/train/{job_id}", timeout=10).json()["progress"]
            httpx.delete(f"{url}/train/{job_id}", timeout=10)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    return {
        "idle": idle,
        "busy": busy,
        "idle_engine": idle_engine,
        "busy_engine": busy_engine,
        "train_tokens_per_s": progress["tokens_per_s"],
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    idle, busy = result["idle"], result["busy"]
    rows = []
    for name, gaps, engine in (("idle", idle, result["idle_engine"]), ("while training", busy, result["busy_engine"])):
        p50, p99 = percentile(gaps, 0.50) * 1000, percentile(gaps, 0.99) * 1000
        mean = engine["sum"] / engine["count"] * 1000 if engine.get("count") else float("nan")
        rows.append(
            f"| {name} | {len(gaps)} | {p50:.2f} | {p99:.2f} | {mean:.2f} | {bucket_percentile(engine, 0.99)} |"
        )
    ratio = percentile(busy, 0.99) / percentile(idle, 0.99)
    verdict = "meets" if ratio <= 3.0 else "misses"
    return "\n".join(
        [
            f"Machine: {machine_summary()}. Serving and training model: char LSTM {args.layers} x {args.hidden}.",
            f"Serving threads {args.serve_threads or 'measured'}; training threads {args.train_threads} "
            "(niced +10, SCHED_IDLE), "
            f"training at {result['train_tokens_per_s']:.0f} tokens/s during the measurement.",
            f"{args.streams} streams x {args.tokens} tokens per phase, one at a time, one SSE event per token "
            "(TEXTGEN_STREAM_INTERVAL_MS=0); gaps between tokens as the client receives them.",
            "",
            "| phase | tokens | client p50 ms | client p99 ms | engine mean ms | engine p99 ms |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Client p99 while training / idle: **{ratio:.2f}x** ({verdict} the <= 3x target). The engine columns "
            "come from `textgen_inter_token_latency_seconds` over the same streams (p99 as a histogram bucket bound).",
        ]
    )


def main() -> None:
    cores = os.cpu_count() or 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--serve-threads", type=int, help="pin TEXTGEN_THREADS (default: unset, the server measures)")
    parser.add_argument("--train-threads", type=int, default=max(1, cores // 2))
    parser.add_argument("--no-write", action="store_true", help="print, do not rewrite bench/RESULTS.md")
    args = parser.parse_args()
    result = run(args)
    text = report(args, result)
    print(text)
    print(json.dumps({k: v for k, v in result.items() if k == "train_tokens_per_s"}))
    if not args.no_write:
        write_section(TITLE, text)


if __name__ == "__main__":
    main()
