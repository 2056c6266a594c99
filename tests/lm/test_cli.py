"""The `textgen` command line as a user runs it: real processes, a tmp models folder, a 2-KB corpus."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from lm.aliases import Canary, FileAliases
from lm.train import TrainConfig, TrainEvent
from tests.corpora import chat_jsonl
from tests.redis_server import free_port
from textgen.cli import ProgressBar, format_progress, main

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly in the old oak tree"
WORDS = SENTENCE.split()
# ~2 KB of lower-case text, the same every run
CORPUS = "\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(9)) for i in range(40)) + "\n"
TINY = [
    *("--embedding-dim", "16", "--hidden-dim", "16", "--layers", "1", "--dropout", "0"),
    *("--seq-len", "16", "--batch-size", "4", "--max-steps", "6", "--threads", "1", "--seed", "7"),
]


def textgen(*args: str, models_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m textgen ARGS` the way a user would; models_dir goes through TEXTGEN_MODELS_DIR."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    if models_dir is not None:
        env["TEXTGEN_MODELS_DIR"] = str(models_dir)
    return subprocess.run(
        [sys.executable, "-m", "textgen", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "Owl Songs.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A models folder holding one tiny model, 'tiny', trained by the CLI."""
    models = tmp_path_factory.mktemp("models")
    proc = textgen("--models-dir", str(models), "train", str(corpus), *TINY, "--name", "tiny")
    assert proc.returncode == 0, proc.stderr
    return models, proc


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- train -> models -> generate -> eval ----------------------------------------------------------


def test_train_publishes_the_model_and_prints_a_summary(trained, corpus):
    models, proc = trained
    summary = dict(line.split(None, 1) for line in proc.stdout.splitlines() if not line.startswith(("val ", "bits")))
    assert summary["model"] == "tiny"
    assert summary["active"] == "yes"  # the first model in a folder becomes active
    assert float(summary["perplexity"]) > 1
    assert "val loss" in proc.stdout and "bits/char" in proc.stdout
    # progress went to stderr (a pipe here: whole lines, no carriage returns)
    assert "step 6/6" in proc.stderr and "100%" in proc.stderr and "tok/s" in proc.stderr
    assert "\r" not in proc.stderr

    config = json.loads((models / "tiny" / "config.json").read_text())
    training = config["training"]
    argv = ["--models-dir", str(models), "train", str(corpus), *TINY, "--name", "tiny"]
    assert training["command"] == shlex.join(["textgen", *argv])
    assert training["corpus_name"] == "Owl Songs.txt"
    assert training["corpus_sha256"] == hashlib.sha256(CORPUS.encode()).hexdigest()
    assert training["corpus_bytes"] == len(CORPUS.encode())
    assert training["parent_model"] is None
    assert training["recipe"]["hidden_dim"] == 16 and training["recipe"]["max_steps"] == 6
    assert training["recipe"]["lr"] == TrainConfig().lr  # an untouched flag keeps TrainConfig's default
    assert config["metrics"]["steps"] == 6


def test_models_list_shows_the_model_whichever_way_the_folder_is_given(trained):
    models, _ = trained
    for proc in (
        textgen("models", models_dir=models),
        textgen("models", "list", "--models-dir", str(models)),
    ):
        assert proc.returncode == 0, proc.stderr
        header, row = proc.stdout.splitlines()
        assert header.split() == ["ID", "ACTIVE", "PARAMS", "TOKENIZER", "VAL", "LOSS", "CREATED"]
        cells = row.split()
        assert cells[:2] == ["tiny", "*"]
        assert cells[3].startswith("char/")


def test_generate_prints_the_continuation(trained):
    models, _ = trained
    first = textgen("generate", "the quick ", "--max-tokens", "25", "--seed", "3", models_dir=models)
    again = textgen("generate", "the quick ", "--max-tokens", "25", "--seed", "3", models_dir=models)
    assert first.returncode == 0, first.stderr
    assert first.stdout.endswith("\n")
    assert len(first.stdout) == 25 + 1  # a char model: one character per token, then the newline
    assert again.stdout == first.stdout


def test_generate_never_prints_the_unknown_token_unless_asked(tmp_path):
    """A model that always prefers <unk> (U+FFFD): masked out by default, sampled with --no-skip-special-tokens."""
    from lm.model import LSTMLanguageModel, ModelConfig
    from lm.registry import Registry
    from lm.tokenizers import UNK_TEXT, fit_tokenizer

    tokenizer = fit_tokenizer("char", CORPUS)
    torch.manual_seed(0)
    model = LSTMLanguageModel(ModelConfig(tokenizer.vocab_size, embedding_dim=16, hidden_dim=16, layers=1)).eval()
    with torch.no_grad():
        model.head.bias[tokenizer.unk_id] = 50.0
    models = tmp_path / "models"
    training = {"recipe": {}, "corpus_sha256": "0" * 64, "corpus_bytes": len(CORPUS)}
    Registry(models).publish(model, tokenizer, model_id="unk-lover", training=training, metrics={}, activate=True)
    args = ("generate", "the ", "--max-tokens", "20", "--temperature", "0.8", "--seed", "1")
    masked = textgen(*args, models_dir=models)
    assert masked.returncode == 0, masked.stderr
    assert len(masked.stdout) == 20 + 1 and UNK_TEXT not in masked.stdout
    raw = textgen(*args, "--no-skip-special-tokens", models_dir=models)
    assert raw.stdout == UNK_TEXT * 20 + "\n"


def test_generate_stops_before_a_stop_string(trained):
    models, _ = trained
    full = textgen("generate", "the ", "--temperature", "0", "--max-tokens", "40", models_dir=models).stdout[:-1]
    stop = full[10:13]
    stopped = textgen("generate", "the ", "--temperature", "0", "--max-tokens", "40", "--stop", stop, models_dir=models)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == full[: full.index(stop)] + "\n"


def test_eval_json_has_exactly_the_documented_keys(trained, corpus):
    models, _ = trained
    proc = textgen("eval", str(corpus), "--model", "tiny", "--json", models_dir=models)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"tokens", "chars", "loss", "perplexity", "bits_per_char"}
    assert result["tokens"] > 1000 and result["chars"] > 1000
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    human = textgen("eval", str(corpus), models_dir=models)  # the active model
    assert human.returncode == 0, human.stderr
    assert f"perplexity  {result['perplexity']:.2f}" in human.stdout


def test_fine_tune_then_show_activate_and_delete(trained, corpus, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trained[0], models)
    tune = textgen("train", str(corpus), *TINY, "--max-steps", "2", "--base-model", "tiny", models_dir=models)
    assert tune.returncode == 0, tune.stderr
    assert tune.stdout.startswith("model       owl-songs\n")  # no --name: the id comes from 'Owl Songs.txt'
    assert "active      no" in tune.stdout  # tiny stays active without --activate

    shown = json.loads(textgen("models", "show", "owl-songs", models_dir=models).stdout)
    assert shown["model_id"] == "owl-songs" and shown["active"] is False
    assert shown["training"]["parent_model"] == "tiny"
    assert (models / "owl-songs" / "tokenizer.json").read_text() == (models / "tiny" / "tokenizer.json").read_text()

    assert textgen("models", "activate", "owl-songs", models_dir=models).returncode == 0
    rows = textgen("models", models_dir=models).stdout.splitlines()[1:]
    assert {r.split()[0]: r.split()[1] for r in rows}["owl-songs"] == "*"
    refused = textgen("models", "delete", "owl-songs", models_dir=models)
    assert refused.returncode == 2
    assert refused.stderr.startswith("textgen: error: 'owl-songs' is the active model")

    assert textgen("models", "activate", "tiny", models_dir=models).returncode == 0
    deleted = textgen("models", "delete", "owl-songs", models_dir=models)
    assert deleted.returncode == 0, deleted.stderr
    assert not (models / "owl-songs").exists()
    assert [r.split()[0] for r in textgen("models", models_dir=models).stdout.splitlines()[1:]] == ["tiny"]


def test_train_activate_canary_then_models_activate_clears_the_canary(trained, corpus, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trained[0], models)
    released = textgen(
        "train", str(corpus), *TINY, "--name", "candidate", "--activate", "canary:0.1", models_dir=models
    )
    assert released.returncode == 0, released.stderr
    assert "active      no: production's canary, serving 10% of its traffic (tiny serves the rest)" in released.stdout
    production = FileAliases(models).all()["production"]  # what GET /models/aliases answers
    assert (production.model, production.canary) == ("tiny", Canary("candidate", 0.1))

    assert textgen("models", "activate", "tiny", models_dir=models).returncode == 0  # = POST /models/tiny/activate
    production = FileAliases(models).all()["production"]
    assert (production.model, production.canary) == ("tiny", None)

    refused = textgen("train", str(corpus), *TINY, "--activate", "canary:2", models_dir=models)
    assert refused.returncode == 2
    assert "canary's weight is a number in (0, 1]" in refused.stderr


def test_a_chat_fine_tune_validates_and_evaluates_on_the_assistants_tokens(trained, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trained[0], models)
    chats = chat_jsonl(CORPUS).splitlines(keepends=True)
    (tmp_path / "chats.jsonl").write_text("".join(chats[:30]), encoding="utf-8")
    (tmp_path / "held-out.jsonl").write_text("".join(chats[30:]), encoding="utf-8")
    files = [str(tmp_path / "chats.jsonl"), "--validation-file", str(tmp_path / "held-out.jsonl")]
    tune = textgen("train", *files, *TINY, "--base-model", "tiny", "--name", "chat", models_dir=models)
    assert tune.returncode == 0, tune.stderr
    shown = json.loads(textgen("models", "show", "chat", models_dir=models).stdout)
    assert shown["training"]["recipe"]["data_format"] == "chat"

    held_out = str(tmp_path / "held-out.jsonl")
    scored = json.loads(textgen("eval", held_out, "--model", "chat", "--json", models_dir=models).stdout)
    # the assistant-only loss the job validated on (eval cuts the text into more streams: nearly the same)
    assert scored["loss"] == pytest.approx(shown["metrics"]["val_loss"], rel=1e-2)
    human = textgen("eval", held_out, "--model", "chat", models_dir=models).stdout
    assert "scored      the assistant's tokens" in human

    refused = textgen("train", str(tmp_path / "chats.jsonl"), "--data-format", "text", *TINY, models_dir=models)
    assert refused.returncode == 2 and "'chat' data, not 'text'" in refused.stderr
    (tmp_path / "bad.jsonl").write_text(chats[0] + '{"messages": [{"content": "x"}]}\n', encoding="utf-8")
    bad = textgen("train", str(tmp_path / "bad.jsonl"), *TINY, models_dir=models)
    assert bad.returncode == 2 and 'line 2: message 1 has no "role"' in bad.stderr


def test_serve_runs_the_service_on_the_given_models_folder(trained, tmp_path):
    models, _ = trained
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "textgen", "serve", "--port", str(port), "--models-dir", str(models)]
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = None
        for _ in range(120):
            time.sleep(0.25)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    ready = json.load(resp)
                break
            except (OSError, ValueError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
        assert ready is not None and ready["status"] == "ready"
        assert ready["model"] == "tiny"  # the active model of the folder given on the command line
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# -- bad input: one line on stderr, exit status 2 -------------------------------------------------


def test_bad_input_in_a_real_process_exits_2_with_one_line(trained, corpus, tmp_path):
    models, _ = trained
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (["generate", "hello", "--model", "nope"], "no model named 'nope'"),
        (["train", str(tmp_path / "empty.txt"), *TINY], "is empty"),
        (["train", str(corpus), *TINY, "--hidden-dim", "0"], "hidden_dim"),
    ]
    for args, fragment in cases:
        proc = textgen(*args, models_dir=models)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        [line] = proc.stderr.splitlines()
        assert line.startswith("textgen: error: ") and fragment in line


def test_generate_without_an_active_model_exits_2(tmp_path):
    proc = textgen("generate", "hi", models_dir=tmp_path / "none-yet")
    assert proc.returncode == 2
    assert proc.stderr.startswith("textgen: error: no model is active")


def bad_corpora(folder: Path) -> dict[str, Path]:
    files = {
        "empty": b"",
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
        "latin1": "caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9\n".encode("latin-1") * 20,
        "short": b"owls\n",
    }
    for name, data in files.items():
        (folder / f"{name}.txt").write_bytes(data)
    return {name: folder / f"{name}.txt" for name in files} | {"missing": folder / "missing.txt"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "{missing}"], "not found"),
        (["train", "{empty}"], "is empty"),
        (["train", "{binary}"], "binary"),
        (["train", "{latin1}"], "UTF-8"),
        (["train", "{short}"], "shorter than one batch"),
        (["train", "{corpus}", "--hidden-dim", "0"], "hidden_dim"),
        (["train", "{corpus}", "--lr", "5"], "lr"),
        (["train", "{corpus}", "--dropout", "0.95"], "dropout"),
        (["train", "{corpus}", "--val-fraction", "0.9"], "val_fraction"),
        (["train", "{corpus}", "--tokenizer", "morse"], "tokenizer"),
        (["train", "{corpus}", "--precision", "fp8"], "precision"),
        (["train", "{corpus}", "--name", "My Model!"], "invalid model id"),
        (["train", "{corpus}", "--name", "tiny"], "already exists"),
        (["train", "{corpus}", "--base-model", "nope"], "no model named 'nope'"),
        (["generate", "--model", "nope"], "no model named 'nope'"),
        (["generate", "--model", "../etc"], "invalid model id"),
        (["generate", "--temperature", "9"], "temperature"),
        (["generate", "--top-p", "0"], "top_p"),
        (["generate", "--stop", ""], "stop"),
        (["eval", "{corpus}", "--model", "nope"], "no model named 'nope'"),
        (["eval", "{missing}"], "not found"),
        (["eval", "{binary}"], "binary"),
        (["models", "show", "nope"], "no model named 'nope'"),
        (["models", "activate", "nope"], "no model named 'nope'"),
        (["models", "delete", "nope"], "no model named 'nope'"),
        (["models", "delete", "tiny"], "is the active model"),
        (["models", "show", "Bad/Id"], "invalid model id"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(args, fragment, trained, corpus, tmp_path, capsys):
    """The same main() the console script runs, in-process to keep the matrix fast."""
    models, _ = trained
    paths = {"corpus": corpus, **bad_corpora(tmp_path)}
    args = [a.format(**paths) if a.startswith("{") else a for a in args]
    if args[0] == "train":  # tiny settings first, so that the case's own flag wins
        args = [*args[:2], *TINY, *args[2:]]
    argv = ["--models-dir", str(models), *args]
    before = sorted(p.name for p in models.iterdir())

    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("textgen: error: ")
    assert fragment in line
    assert sorted(p.name for p in models.iterdir()) == before  # nothing was written


@pytest.mark.parametrize("command", [["models"], ["train", "corpus.txt"], ["worker"], ["serve"], ["generate", "hi"]])
@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("TEXTGEN_TRAIN_THREADS", "abc", "valid integer"),
        ("TEXTGEN_JOB_LEASE_S", "-1", "greater than 0"),
        ("TEXTGEN_NATIVE", "sometimes", "valid boolean"),
        ("TEXTGEN_THREADS", "0", "greater than or equal to 1"),
        ("TEXTGEN_MAX_TOKENS", "many", "valid integer"),
    ],
)
def test_a_malformed_setting_ends_every_command_with_one_line_naming_it(
    command, variable, value, fragment, tmp_path, monkeypatch, capsys
):
    """Every command reads the TEXTGEN_* environment through the one settings class, and refuses a bad value
    the same way, before it does anything."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"textgen: error: {variable}={value}: ") and fragment in line
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_a_flag_that_overrides_a_setting_is_named_when_it_is_out_of_bounds(capsys):
    assert main(["worker", "--redis-url", "redis://127.0.0.1:1", "--threads", "-2"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("textgen: error: --threads=-2: ") and "greater than or equal to 0" in line


def test_textgen_native_false_trains_through_nn_lstm(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEXTGEN_NATIVE", "false")
    assert main(["--models-dir", str(tmp_path), "train", str(corpus), *TINY, "--name", "plain"]) == 0
    assert "(nn.LSTM LSTM kernel)" in capsys.readouterr().out
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["metrics"]["lstm_kernel"] == "nn.LSTM"


def test_flags_argparse_cannot_parse_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "corpus.txt", "--layers", "two"])
    assert exc.value.code == 2
    assert "textgen train: error: argument --layers: invalid int value: 'two'" in capsys.readouterr().err


def test_worker_help_documents_its_options_and_never_shows_the_redis_url(capsys, monkeypatch):
    monkeypatch.setenv("TEXTGEN_REDIS_URL", "redis://:s3cret-pass@redis:6379/0")
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: textgen worker")
    for option in ("--redis-url", "--models-dir", "--threads", "--lease", "--prefix", "--burst"):
        assert option in out
    assert "TEXTGEN_REDIS_URL" in out and "s3cret-pass" not in out


# -- the progress line ----------------------------------------------------------------------------


def event(kind: str = "progress", step: int = 30, val_loss: float | None = None) -> TrainEvent:
    return TrainEvent(
        kind=kind,
        epoch=2,
        epochs=3,
        step=step,
        total_steps=120,
        train_loss=2.3456,
        val_loss=val_loss,
        tokens_per_s=1234.4,
        eta_s=75.2,
        elapsed_s=20.0,
    )


def test_progress_line_shows_epoch_step_loss_speed_and_eta():
    line = format_progress(event(val_loss=2.1))
    assert line == "epoch 2/3 step 30/120 [#####---------------]  25% loss 2.346 val 2.100 1234 tok/s ETA 0:01:15"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal():
    screen = Terminal()
    bar = ProgressBar(screen)
    bar(event(step=30, val_loss=2.1))
    bar(event(step=60))  # a shorter line: the leftovers of the longer one are blanked
    bar(event(kind="state_saved"))  # not drawn
    bar.close()
    first, second = screen.getvalue()[1:].split("\r")
    assert second.rstrip() == format_progress(event(step=60))
    assert len(second) == len(first) + 1  # padded to the old width, then the final newline
    assert second.endswith("\n")


def test_progress_writes_a_line_every_few_seconds_when_not_a_terminal():
    log = io.StringIO()
    now = [0.0]
    bar = ProgressBar(log, interval=5.0, clock=lambda: now[0])
    for t, step in [(0.0, 1), (2.0, 2), (4.0, 3), (5.5, 4), (6.0, 5)]:
        now[0] = t
        bar(event(step=step))
    bar(event(kind="epoch", step=6, val_loss=2.0))  # an epoch's end is always written
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[3] for line in lines] == ["1/120", "4/120", "6/120"]
    assert "\r" not in log.getvalue()


def test_textgen_threads_also_sizes_openmp_for_every_thread(tmp_path):
    """OpenMP reads OMP_NUM_THREADS once, when torch loads: the CLI sets it from TEXTGEN_THREADS before
    that, so threads started later (the engine's) get that many too, not one per core."""
    code = (
        "import sys, threading\n"
        "from textgen.cli import main\n"
        "main(sys.argv[1:])\n"
        "import torch\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "t.start(); t.join()\n"
        "print('threads', seen[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), TEXTGEN_THREADS="1")  # torch would take one per core (2 here)
    done = subprocess.run(
        [sys.executable, "-c", code, "models", "list", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "threads 1"
