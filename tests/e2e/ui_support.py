"""Helpers of the browser tests (tests/e2e/test_ui.py): a tiny models folder, a real `textgen serve`
process, and headless Chromium driven by Playwright.

The models are 16-unit char LSTMs with fixed random weights, so generation runs at thousands of
tokens a second and a training job on the 1-KB corpus takes a few seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import Registry
from lm.tokenizers import fit_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-output" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

CORPUS = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
"""
MODELS = ("tiny-a", "tiny-b", "tiny-c")  # tiny-a is active
TRAINING = {"recipe": {"note": "random weights for tests"}, "corpus_sha256": "0" * 64, "corpus_bytes": len(CORPUS)}


def tiny_model(vocab_size: int, seed: int) -> LSTMLanguageModel:
    """A 16-unit, 1-layer LSTM with peaked random weights (distinct text per seed)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size, embedding_dim=16, hidden_dim=16, layers=1, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 2.0)
    return model


def build_models(path: Path) -> Path:
    """Publish MODELS into `path` (newest last) and activate the first."""
    registry = Registry(path)
    tokenizer = fit_tokenizer("char", CORPUS)
    for seed, model_id in enumerate(MODELS, start=1):
        metrics = {"val_loss": 3.0 + seed / 10, "val_perplexity": 20.0 + seed}
        registry.publish(
            tiny_model(tokenizer.vocab_size, seed), tokenizer, model_id=model_id, training=TRAINING, metrics=metrics
        )
        time.sleep(0.01)  # distinct created_at: listings are newest first
    registry.activate(MODELS[0])
    return path


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(models_dir: Path, log_dir: Path, ready: str = "/readyz", **env: str) -> Server:
    """`python -m textgen serve` on a free port with TEXTGEN_* settings from `env`; waits until `ready` is 200."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    settings = {"THREADS": "1", "TRAIN_THREADS": "1", **{k.upper(): v for k, v in env.items()}}
    environ = {**os.environ, **{f"TEXTGEN_{k}": v for k, v in settings.items()}}
    cmd = [sys.executable, "-m", "textgen", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(models_dir)]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}{ready}", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"server not ready after 60 s:\n{server.log()}")


def stop_servers(servers: list[Server]) -> None:
    """SIGINT to every server at once (each drains and stops its training worker), then wait for each."""
    running = [s for s in servers if s.process.poll() is None]
    for server in running:
        server.process.send_signal(signal.SIGINT)
    for server in running:
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def stop_server(server: Server) -> None:
    stop_servers([server])
