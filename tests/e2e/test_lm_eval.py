"""EleutherAI's lm-evaluation-harness, unmodified, against a real `textgen serve`.

The harness's `local-completions` model scores through `/v1/completions` (`echo`, `logprobs`,
`max_tokens: 1`) and tokenizes through the vLLM routes (`tokenizer_backend=remote`: `/tokenizer_info`,
`/tokenize`, `/detokenize`). Two tasks of our own, on local JSON files (tests/e2e/lm_eval/; no
download): the perplexity of a held-out Shakespeare text (`loglikelihood_rolling`), and a small
multiple-choice test. Its bits per byte must agree with `textgen eval`'s bits per character on the
same (ASCII) text within 2%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "e2e" / "lm_eval"
SHIPPED = "shakespeare-char"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A real server on a copy of a shipped model (nothing touches the repository's models folder)."""
    root = tmp_path_factory.mktemp("lm-eval")
    models = root / "models"
    shutil.copytree(ROOT / "models" / SHIPPED, models / SHIPPED)
    server = start_server(models, root, default_model=SHIPPED)
    yield server, models
    stop_server(server)


def run_harness(server: Server, out: Path) -> subprocess.CompletedProcess[str]:
    """`python -m lm_eval` as a user runs it, offline (HF_*_OFFLINE: the tasks' data are local files)."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(out / "hf"),  # the datasets cache, kept out of the user's home
        "OPENAI_API_KEY": "unused",
        "OMP_NUM_THREADS": "1",
    }
    model_args = f"model={SHIPPED},base_url={server.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    cmd += ["--tasks", "textgen_heldout,textgen_choice", "--include_path", str(TASKS)]
    cmd += ["--output_path", str(out / "results"), "--log_samples"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def textgen_eval(models: Path, corpus: Path) -> dict[str, float]:
    env = {**os.environ, "TEXTGEN_MODELS_DIR": str(models), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "textgen", "eval", str(corpus), "--model", SHIPPED, "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def test_the_harness_scores_a_served_model(served: tuple[Server, Path], tmp_path: Path) -> None:
    server, models = served
    proc = run_harness(server, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    # perplexity: the harness's bits per byte against `textgen eval`'s bits per character
    (line,) = (TASKS / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    text = json.loads(line)["text"]
    assert text.isascii()  # one byte per character
    corpus = tmp_path / "held-out.txt"
    corpus.write_text(text, encoding="utf-8")
    bits_per_char = textgen_eval(models, corpus)["bits_per_char"]
    bits_per_byte = results["textgen_heldout"]["bits_per_byte,none"]
    assert abs(bits_per_byte - bits_per_char) / bits_per_char < 0.02, (bits_per_byte, bits_per_char)

    # multiple choice: the model knows its Shakespeare from nonsense
    assert results["textgen_choice"]["acc,none"] == 1.0
    # and the harness read the server's numbers: each choice's log-likelihood is the sum of the
    # continuation's token_logprobs from echo, asked here the same way
    (samples_file,) = (tmp_path / "results").rglob("samples_textgen_choice_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 6
    for sample in samples:
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["resps"], strict=True):
            loglikelihood = float(response[0][0])  # the samples file keeps it as a string
            assert loglikelihood == pytest.approx(continuation_logprob(server, doc["context"], " " + choice), abs=1e-4)


def continuation_logprob(server: Server, context: str, continuation: str) -> float:
    """The sum of the continuation's log-probabilities after the context, from echo (a char model: one token
    per character)."""
    body = {"model": SHIPPED, "prompt": context + continuation, "echo": True, "logprobs": 1, "max_tokens": 0}
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    scores = answer.json()["choices"][0]["logprobs"]["token_logprobs"]
    return float(sum(scores[len(context) :]))
