"""What the tests of training jobs share, in-process (tests/app) and end to end (tests/e2e): a corpus,
the hyperparameters of a tiny job, the states a job ends in, and a reader for the job event streams."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# a 16-unit, one-layer LSTM: an epoch on a few KB takes a fraction of a second on one thread
TINY: dict[str, Any] = {
    "embedding_dim": 16,
    "hidden_dim": 16,
    "layers": 1,
    "seq_len": 16,
    "batch_size": 4,
    "epochs": 2,
    "warmup_steps": 2,
    "threads": 1,
}

FINAL_STATES = ("succeeded", "failed", "cancelled")


def shakespeare(chars: int) -> str:
    """`chars` characters of the Shakespeare corpus, from character 20,000 on (plain dialogue, ASCII)."""
    text = (ROOT / "data" / "shakespeare" / "shakespeare.txt").read_text(encoding="utf-8")
    return text[20_000 : 20_000 + chars]


def sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The named events of a Server-Sent Events stream, line by line: (name, JSON data)."""
    name: str | None = None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name is not None:
            yield name, json.loads(line[6:])
            name = None


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """The named events of a whole Server-Sent Events body."""
    return list(sse(body.splitlines()))
