"""Fixtures for the service tests: a tiny models folder, ASGI clients, and real uvicorn servers.

The models folder holds three char models built from a 1-KB corpus with fixed random weights
(16 hidden units, so everything runs in milliseconds):
- `tiny-a` (active): the default chat template;
- `tiny-b`: a chat template of its own ("Q: " / "A: ", stop at a newline);
- `tiny-nan`: NaN weights, which validation must refuse.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from app.main import create_app
from app.settings import Settings
from lm.model import LSTMLanguageModel, ModelConfig
from lm.registry import Registry
from lm.tokenizers import fit_tokenizer
from tests.corpora import HAMLET, SONNET_18, first_lines
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]

CORPUS = first_lines(SONNET_18, 4) + first_lines(HAMLET, 5) + "QA: User Assistant System 0123456789 ?!\n"
MODEL_A = "tiny-a"
MODEL_B = "tiny-b"
MODEL_NAN = "tiny-nan"
B_TEMPLATE = {"system": "S: ", "user": "Q: ", "assistant": "A: ", "separator": "\n", "stop": ["\n"]}
TRAINING = {"recipe": {"note": "random weights for tests"}, "corpus_sha256": "0" * 64, "corpus_bytes": len(CORPUS)}


def _tiny_model(vocab_size: int, seed: int) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size, embedding_dim=16, hidden_dim=16, layers=2, dropout=0.0)
    model = LSTMLanguageModel(cfg).eval()
    with torch.no_grad():  # larger than the training init, so that each model has peaked, distinct predictions
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 2.0)
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # the test machine's cores are shared; a 16-unit LSTM gains nothing from more


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def models_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models folder, built once; tests get copies (activation moves the pointer)."""
    path = tmp_path_factory.mktemp("models-template")
    tokenizer = fit_tokenizer("char", CORPUS)
    registry = Registry(path)
    metrics = {"val_loss": 4.0}
    registry.publish(
        _tiny_model(tokenizer.vocab_size, 1), tokenizer, model_id=MODEL_A, training=TRAINING, metrics=metrics
    )
    time.sleep(0.01)  # distinct created_at: listings are newest first
    registry.publish(
        _tiny_model(tokenizer.vocab_size, 2),
        tokenizer,
        model_id=MODEL_B,
        training=TRAINING,
        metrics=metrics,
        chat_template=B_TEMPLATE,
    )
    broken = _tiny_model(tokenizer.vocab_size, 3)
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))
    registry.publish(broken, tokenizer, model_id=MODEL_NAN, training=TRAINING, metrics=metrics)
    registry.activate(MODEL_A)
    return path


@pytest.fixture
def models_dir(models_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "models"
    shutil.copytree(models_template, path)
    return path


# ---------------------------------------------------------------------------- ASGI


ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_client(models_dir: Path) -> AsyncIterator[ClientFactory]:
    """make_client(**settings): an httpx client on a fresh app (lifespan run, initial model loaded)."""
    stack: list[tuple[object, httpx.AsyncClient]] = []

    async def make(**overrides: object) -> httpx.AsyncClient:
        settings = Settings(**{"models_dir": models_dir, "threads": 1, **overrides})  # type: ignore[arg-type]
        app = create_app(settings)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        await app.state.loading
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://textgen.test")
        client.app = app  # type: ignore[attr-defined]
        stack.append((lifespan, client))
        return client

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def occupy_the_only_slot(client: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    """On a client made with max_running=1, max_waiting=0: a generation long enough (about 1 s) to outlast
    the 0.25 s a client at its own limit waits for its slots, once it holds the slot. Await it at the end."""
    long = asyncio.create_task(client.post("/generate", json={"prompt": "a", "max_tokens": 50_000}))
    for _ in range(100):  # until the long one runs
        if client.app.state.admission.admitted:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    return long


@pytest.fixture
async def client(make_client: ClientFactory) -> httpx.AsyncClient:
    return await make_client()


# ---------------------------------------------------------------------------- Redis mode


@pytest.fixture
def redis_mode(redis_server: RedisServer) -> dict[str, object]:
    """Settings for make_client(**redis_mode): jobs in Redis (no worker takes them), tiny-a served."""
    return {"redis_url": redis_server.url, "redis_prefix": f"test-{secrets.token_hex(4)}:", "default_model": MODEL_A}


# ---------------------------------------------------------------------------- uvicorn


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    *,
    name: str = "server",
    path: str = "/readyz",
    timeout: float = 60,
) -> None:
    """Poll `url` + `path` until it answers 200; a RuntimeError with the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()}")
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {timeout}s:\n{log()}")


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
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server.url, process, server.log, path=ready)
    except RuntimeError:
        stop_server(server)
        raise
    return server


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


@pytest.fixture(scope="module")
def server(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server per test module: 2 running slots, 1 waiting, quick keep-alives, a huge token cap, JSON logs;
    one client (every test's address is 127.0.0.1) may take every slot."""
    root = tmp_path_factory.mktemp("server")
    models = root / "models"
    shutil.copytree(models_template, models)
    srv = start_server(
        models,
        root,
        max_running="2",
        max_waiting="1",
        max_running_per_client="0",
        keepalive_s="0.2",
        max_tokens="1000000",
        log_json="true",
    )
    yield srv
    stop_server(srv)
