"""The `textgen` command line: train, generate, eval, models, serve, worker.

Every command reads the TEXTGEN_* environment once, through the service's settings class
(app/settings.py `Settings`, which holds the job system's settings too); its flags override it.
Bad input (a malformed TEXTGEN_* value, a missing corpus, a hyperparameter out of bounds, an
unknown model id) ends with one `textgen: error: ...` line on stderr and exit status 2, as
argparse does for bad flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from app.settings import Settings
from jobs.records import DEFAULT_LEASE_S
from jobs.redis_client import DEFAULT_PREFIX
from lm import __version__, cpu
from lm.errors import ConfigError, ModelNotFound, TextgenError

log = logging.getLogger("textgen")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EVAL_KEYS = ("tokens", "chars", "loss", "perplexity", "bits_per_char")
SCORED = {"text": "every token", "chat": "the assistant's tokens", "completion": "the completions' tokens"}

# `textgen train` flag -> (TrainConfig field, type, help). Each field keeps its TrainConfig default
# unless the flag is given, so the defaults live in one place.
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--tokenizer", "tokenizer", str, "tokenizer kind: char, word or bpe"),
    ("--vocab-size", "vocab_size", int, "vocabulary size cap, <unk> included (default: per tokenizer)"),
    ("--embedding-dim", "embedding_dim", int, "embedding width"),
    ("--hidden-dim", "hidden_dim", int, "LSTM hidden units per layer"),
    ("--layers", "layers", int, "stacked LSTM layers"),
    ("--dropout", "dropout", float, "dropout probability"),
    ("--tie-weights", "tie_weights", argparse.BooleanOptionalAction, "share input and output embeddings"),
    ("--seq-len", "seq_len", int, "tokens per truncated-BPTT window"),
    ("--batch-size", "batch_size", int, "parallel streams per step"),
    ("--lr", "lr", float, "learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--grad-clip", "grad_clip", float, "gradient norm clip"),
    ("--warmup-steps", "warmup_steps", int, "linear learning-rate warmup steps"),
    ("--epochs", "epochs", int, "passes over the training split; caps a --time-budget run only when given"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps"),
    ("--time-budget", "time_budget_s", float, "stop after this many seconds"),
    ("--patience", "patience", int, "stop after this many epochs without a better val loss"),
    ("--val-fraction", "val_fraction", float, "share of the corpus (its end) held out for validation"),
    ("--seed", "seed", int, "random seed"),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--precision", "precision", str, "auto, bf16 or fp32"),
    ("--device", "device", str, "auto, cpu or cuda"),
    ("--data-format", "data_format", str, "the corpus's format: text, chat or completion JSONL (docs/TRAINING.md)"),
    ("--weight-drop", "weight_drop", float, "DropConnect on the LSTM's hidden-to-hidden weights (AWD-LSTM)"),
    ("--locked-dropout", "locked_dropout", argparse.BooleanOptionalAction, "one dropout mask for every step"),
    ("--embedding-dropout", "embedding_dropout", float, "drop whole tokens' embeddings"),
    ("--ar", "ar", float, "activation regularisation: weight of mean(h^2)"),
    ("--tar", "tar", float, "temporal activation regularisation: weight of mean((h_t - h_t-1)^2)"),
    ("--ema", "ema", float, "keep an EMA of the weights with this decay (e.g. 0.999); 0: off"),
]
# flags whose TrainConfig default is not what an omitted flag means
FITTED = "fitted to the corpus and budget"
OMITTED_MEANS = {
    "data_format": "detected from the corpus",
    "epochs": "10, or none under --time-budget",
    **{size: FITTED for size in ("vocab_size", "embedding_dim", "hidden_dim", "layers", "dropout", "tie_weights")},
}


# flags that override a setting: settings field -> the flag's name in an error message
FLAG_SETTINGS = {
    "models_dir": "--models-dir",
    "host": "--host",
    "port": "--port",
    "redis_url": "--redis-url",
    "train_threads": "--threads",
    "job_lease_s": "--lease",
    "redis_prefix": "--prefix",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    omp_threads_from_settings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = load_settings(args)
        return args.handler(args, settings, argv) or 0
    except TextgenError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        if exc.detail:  # the operator's own machine: the path or address helps
            message += f" ({' '.join(exc.detail.split())})"
        print(f"textgen: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("textgen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def load_settings(args: argparse.Namespace) -> Settings:
    """The TEXTGEN_* environment with the command's flags over it; ConfigError naming what is malformed."""
    overrides = {field: getattr(args, field) for field in FLAG_SETTINGS if getattr(args, field, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            name = FLAG_SETTINGS[field] if field in overrides else f"TEXTGEN_{field.upper()}"
            problems.append(f"{name}={error.get('input')!s}: {error['msg']}")
        raise ConfigError("; ".join(problems), None) from None


def omp_threads_from_settings() -> None:
    """OpenMP sizes its thread team from OMP_NUM_THREADS once, when torch loads, and torch loads after
    this (building the parser does: `textgen train --help` shows TrainConfig's defaults). So the team
    is sized here, unless OMP_NUM_THREADS is set: to TEXTGEN_THREADS when that pins the engines'
    threads (otherwise a 1-thread engine still starts a team per core, whose spin-waiting takes the
    core the event loop needs; docs/PERFORMANCE.md, "Threads"), else to the cores this process may use
    (lm/cpu.py: in a container limited to 2 CPUs, 2, where torch would take every host core). A
    malformed environment is left to `load_settings`, which reports it once the flags are parsed."""
    try:
        threads = Settings().threads
    except ValidationError:
        return
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads or cpu.cores()))


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags alone: the environment is read once, by `load_settings`, after parsing."""
    parser = argparse.ArgumentParser(prog="textgen", description="Train and serve LSTM language models.")
    parser.add_argument("--version", action="version", version=f"textgen {__version__}")
    parser.add_argument("--models-dir", type=Path, help="models folder (default: TEXTGEN_MODELS_DIR, else ./models)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    # the subcommands accept --models-dir too; SUPPRESS keeps the global value when they are not given it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", type=Path, default=argparse.SUPPRESS, help="models folder")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub, common)
    _add_generate(sub, common)
    _add_eval(sub, common)
    _add_models(sub, common)
    _add_serve(sub, common)
    _add_worker(sub, common)
    return parser


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="train a model on a text file and publish it")
    p.add_argument("corpus", type=Path, help="UTF-8 text file")
    defaults = _train_defaults()
    for flag, dest, kind, text in TRAIN_FLAGS:
        default = OMITTED_MEANS.get(dest, defaults.get(dest))
        help_text = text if default is None else f"{text} (default: {default})"
        if kind is argparse.BooleanOptionalAction:
            p.add_argument(flag, dest=dest, action=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=help_text)
    p.add_argument("--name", help="model id (default: from the corpus file name)")
    p.add_argument("--base-model", metavar="ID", help="fine-tune this model (keeps its tokenizer and shape)")
    p.add_argument(
        "--activate",
        nargs="?",
        const=True,
        default=False,
        type=_activate_flag,
        metavar="canary:WEIGHT",
        help="make the new model the active one; with canary:WEIGHT (e.g. canary:0.1, after the corpus), "
        "production's canary at that weight instead",
    )
    p.add_argument("--state-dir", type=Path, help="write per-epoch resumable state here; resume from it")
    p.add_argument(
        "--validation-file",
        type=Path,
        metavar="PATH",
        help="validate on this text (the corpus's format) instead of the corpus's last --val-fraction",
    )
    p.set_defaults(handler=cmd_train)


def _train_defaults() -> dict[str, Any]:
    from lm.train import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[common], help="continue a prompt, streaming to stdout")
    p.add_argument("prompt", nargs="?", default="", help="text to continue (default: empty)")
    p.add_argument("--model", metavar="ID", help="model id (default: the active model)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--no-skip-special-tokens",
        dest="skip_special_tokens",
        action="store_false",
        help="let the model sample its unknown token (printed as U+FFFD), which is masked out by default",
    )
    p.set_defaults(handler=cmd_generate)


def _add_eval(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common], help="loss, perplexity and bits per char of a model on a text")
    p.add_argument("corpus", type=Path, help="UTF-8 text file")
    p.add_argument("--model", metavar="ID", help="model id (default: the active model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_eval)


def _add_models(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="list, show, activate or delete models")
    p.set_defaults(handler=cmd_models_list)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[common], help="the models, newest first").set_defaults(handler=cmd_models_list)
    for name, handler, text in [
        ("show", cmd_models_show, "a model's config.json"),
        ("activate", cmd_models_activate, "make a model the active one"),
        ("delete", cmd_models_delete, "delete a model (not the active one)"),
    ]:
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("model_id", metavar="ID")
        a.set_defaults(handler=handler)


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the HTTP service")
    # None keeps the service's own settings (TEXTGEN_HOST / TEXTGEN_PORT, else 127.0.0.1:8000)
    p.add_argument("--host", help="address to bind (default: TEXTGEN_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: TEXTGEN_PORT or 8000)")
    p.set_defaults(handler=cmd_serve)


def _add_worker(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("worker", parents=[common], help="take training jobs from the Redis queue")
    p.add_argument("--redis-url", help="(default: TEXTGEN_REDIS_URL)")
    p.add_argument(
        "--threads",
        type=int,
        dest="train_threads",
        help="torch threads per job (default: TEXTGEN_TRAIN_THREADS, else half the cores)",
    )
    p.add_argument(
        "--lease",
        type=float,
        dest="job_lease_s",
        help=f"seconds before a silent worker's job moves (default: TEXTGEN_JOB_LEASE_S, else {DEFAULT_LEASE_S:g})",
    )
    p.add_argument(
        "--prefix", dest="redis_prefix", help=f"Redis key prefix (default: TEXTGEN_REDIS_PREFIX, else {DEFAULT_PREFIX})"
    )
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(handler=cmd_worker)


# -- train ----------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from lm.checkpoint import validate_model_id
    from lm.data import read_corpus
    from lm.train import TrainConfig, train

    text = read_corpus(args.corpus)
    cfg = TrainConfig(**{dest: getattr(args, dest) for _, dest, _, _ in TRAIN_FLAGS if hasattr(args, dest)})
    cfg.data_format = _data_format(text, getattr(args, "data_format", None), "--data-format")
    cfg.validate()
    val_text = read_corpus(args.validation_file) if args.validation_file else None
    if val_text is not None:
        _data_format(val_text, cfg.data_format, "--validation-file")
    registry, aliases = _models(settings)
    # without --name the id comes from the file name: 'Owl Songs.txt' -> 'owl-songs' (or owl-songs-2, ...)
    model_id = validate_model_id(args.name) if args.name else registry.unique_id(args.corpus.stem)
    if args.name and _exists(registry, model_id):
        raise ConfigError(f"a model named {model_id!r} already exists; choose another --name", "name")
    base = registry.load(args.base_model) if args.base_model else None

    progress = ProgressBar(sys.stderr)
    try:
        result = train(
            text,
            cfg,
            on_event=progress,
            state_dir=args.state_dir,
            base=base,
            native=settings.native,
            val_text=val_text,
        )
    finally:
        progress.close()
    training = {
        "recipe": result.config.to_dict(),
        "corpus_name": args.corpus.name,
        "corpus_sha256": result.corpus_sha256,
        "corpus_bytes": result.corpus_bytes,
        "seed": result.config.seed,
        "parent_model": base.model_id if base else None,
        "command": shlex.join(["textgen", *argv]),
    }
    model_id = registry.publish(
        result.model,
        result.tokenizer,
        model_id=model_id,
        training=training,
        metrics=result.metrics,
        chat_template=result.chat_template,  # a fine-tune keeps its base model's
    )
    active = _release(registry, aliases, model_id, args.activate)
    _print_summary(model_id, result.metrics, registry.path(model_id), active)
    return 0


def _activate_flag(value: str) -> str:
    """`--activate canary:WEIGHT`: the weight is checked here, as POST /train checks its `activate`."""
    from lm.aliases import canary_weight

    try:
        if canary_weight(value) is not None:
            return value
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    raise argparse.ArgumentTypeError(f"expected nothing or canary:WEIGHT, not {value!r}")


def _release(registry: Any, aliases: Any, model_id: str, activate: bool | str) -> str:
    """Make the new model production's model (as POST /models/{id}/activate: its canary cleared) or, with
    canary:WEIGHT, production's canary; the first model becomes active. Returns the summary's "active" line."""
    from lm.aliases import PRODUCTION, Canary, canary_weight, set_alias

    production = registry.active_id()
    weight = canary_weight(activate)
    if weight is not None and production is not None:
        set_alias(aliases, PRODUCTION, production, Canary(model_id, weight), expected_model=production)
        return f"no: production's canary, serving {weight * 100:g}% of its traffic ({production} serves the rest)"
    if activate or production is None:
        registry.get(model_id)
        set_alias(aliases, PRODUCTION, model_id, None)
        return "yes"
    return "no"


def _data_format(text: str, expected: str | None, flag: str) -> Any:
    """The text's format (lm/formats.py: checked line by line); ConfigError when it is not `expected`."""
    from lm.formats import validate_text

    found = validate_text(text)
    if expected is not None and found != expected:
        raise ConfigError(f"{flag}: the text is {found!r} data, not {expected!r}", "data_format")
    return found


def _exists(registry: Any, model_id: str) -> bool:
    try:
        registry.get(model_id)
    except ModelNotFound:
        return False
    return True


def _print_summary(model_id: str, metrics: dict, path: Path, active: str) -> None:
    rows = [
        ("model", model_id),
        ("val loss", _fmt(metrics.get("val_loss"), ".4f")),
        ("perplexity", _fmt(metrics.get("val_perplexity"), ".2f")),
        ("bits/char", _fmt(metrics.get("val_bits_per_char"), ".3f")),
        ("steps", f"{metrics.get('steps', '-')} (stopped by {metrics.get('stopped_by', '-')})"),
        *_recipe_rows(metrics),
        ("time", _duration(metrics.get("elapsed_s"))),
        (
            "speed",
            f"{_fmt(metrics.get('tokens_per_s'), '.0f')} tokens/s ({metrics.get('lstm_kernel', '-')} LSTM kernel)",
        ),
        ("active", active),
        ("path", str(path)),
    ]
    for key, value in rows:
        print(f"{key:<11} {value}")


def _recipe_rows(metrics: dict) -> list[tuple[str, str]]:
    """The summary's lines on the weights kept and the sizes the recipe fitted (lm/train/sizing.py), and why."""
    rows = []
    if metrics.get("kept") == "best" and metrics.get("best_epoch") is not None:
        rows.append(("kept", f"epoch {metrics['best_epoch']} of {metrics.get('epochs', '-')} (best validation loss)"))
    choice = metrics.get("recipe_choice")
    if choice:
        tied = ", tied" if choice.get("tie_weights") else ""
        vocab = f", vocabulary cap {choice['vocab_size']}" if choice.get("vocab_size") else ""
        rows.append(
            (
                "recipe",
                f"{choice.get('layers')} x {choice.get('hidden_dim')} units, embedding {choice.get('embedding_dim')}"
                f"{tied}, dropout {choice.get('dropout')}{vocab}",
            )
        )
        rows.append(("why", str(choice.get("reason", "-"))))
    return rows


class ProgressBar:
    """A one-line progress display fed by lm.train events.

    On a terminal the line is redrawn in place (`\\r`); otherwise (a log file, a pipe) a line is
    written at most every `interval` seconds and at each epoch's end.
    """

    def __init__(self, stream: TextIO, interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval
        self.clock = clock
        self._last_write = float("-inf")
        self._width = 0  # length of the line on screen, to blank leftovers of a longer one

    def __call__(self, event: Any) -> None:
        if event.kind not in ("progress", "epoch"):
            return
        line = format_progress(event)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif event.kind == "epoch" or self.clock() - self._last_write >= self.interval:
            self.stream.write(line + "\n")
            self._last_write = self.clock()
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def format_progress(event: Any, bar_width: int = 20) -> str:
    """'epoch 1/3 step 120/400 [######--------------]  30% loss 2.345 val 2.101 1234 tok/s ETA 42.0s'"""
    total = max(event.total_steps or 0, 1)
    done = min(event.step / total, 1.0)
    filled = int(done * bar_width)
    parts = [
        f"epoch {event.epoch}/{event.epochs}",
        f"step {event.step}/{event.total_steps}",
        f"[{'#' * filled}{'-' * (bar_width - filled)}] {done:4.0%}",
        f"loss {_fmt(event.train_loss, '.3f')}",
    ]
    if event.val_loss is not None:
        parts.append(f"val {event.val_loss:.3f}")
    parts.append(f"{event.tokens_per_s:.0f} tok/s")
    parts.append(f"ETA {_duration(event.eta_s)}")
    return " ".join(parts)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    """'4.2s' under a minute, else 'h:mm:ss'."""
    if seconds is None:
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- generate / eval ------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from lm.registry import Registry
    from lm.sampler import SamplingParams, stream_generate

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
        skip_special_tokens=args.skip_special_tokens,
    )
    params.validate()
    ckpt = Registry(settings.models_dir).load(args.model)
    for piece in stream_generate(ckpt.model, ckpt.tokenizer, args.prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from lm.data import read_corpus
    from lm.registry import Registry
    from lm.train import evaluate

    text = read_corpus(args.corpus)
    ckpt = Registry(settings.models_dir).load(args.model)
    data_format = _data_format(text, None, "corpus")  # chat: the assistant's tokens only (docs/TRAINING.md)
    metrics = evaluate(
        ckpt.model, ckpt.tokenizer, text, data_format=data_format, chat_template=ckpt.config.get("chat_template")
    )
    result = {key: metrics[key] for key in EVAL_KEYS}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'model':<11} {ckpt.model_id}")
    print(f"{'scored':<11} {SCORED[data_format]}")
    print(f"{'tokens':<11} {result['tokens']}")
    print(f"{'chars':<11} {result['chars']}")
    print(f"{'loss':<11} {result['loss']:.4f}")
    print(f"{'perplexity':<11} {result['perplexity']:.2f}")
    print(f"{'bits/char':<11} {result['bits_per_char']:.3f}")
    return 0


# -- models ---------------------------------------------------------------------------------------


def _models(settings: Settings) -> tuple[Any, Any]:
    """The registry and the aliases where the service keeps them: the active pointer and the aliases in
    Redis with TEXTGEN_REDIS_URL, else in the models folder."""
    from jobs.store import backend_from_settings
    from lm.registry import Registry

    backend = backend_from_settings(settings)
    return Registry(settings.models_dir, backend.pointer), backend.aliases


def cmd_models_list(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    infos = _models(settings)[0].list()
    if not infos:
        print(f"no models in {settings.models_dir}")
        return 0
    header = ("ID", "ACTIVE", "PARAMS", "TOKENIZER", "VAL LOSS", "CREATED")
    rows = [header] + [_model_row(info) for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _model_row(info: Any) -> tuple[str, ...]:
    tok = info.tokenizer
    if isinstance(tok, dict):  # {"kind": "char", "vocab_size": 65}
        tok = f"{tok.get('kind', '?')}/{tok.get('vocab_size', '?')}"
    val_loss = (info.metrics or {}).get("val_loss")
    return (
        info.model_id,
        "*" if info.active else "",
        f"{info.parameters:,}" if isinstance(info.parameters, int) else "-",
        str(tok),
        _fmt(val_loss, ".4f"),
        str(info.created_at)[:19].replace("T", " "),
    )


def cmd_models_show(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from lm.checkpoint import read_config

    registry = _models(settings)[0]
    info = registry.get(args.model_id)
    config = read_config(info.path)
    config["active"] = info.active
    print(json.dumps(config, indent=2, ensure_ascii=False))
    return 0


def cmd_models_activate(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    """= POST /models/{id}/activate (PUT /models/aliases/production {"model": id}): production's canary is cleared."""
    from lm.aliases import PRODUCTION, set_alias

    registry, aliases = _models(settings)
    registry.load(args.model_id)  # ModelNotFound / CheckpointError before the pointer moves
    set_alias(aliases, PRODUCTION, args.model_id, None)
    print(f"active model: {args.model_id}")
    return 0


def cmd_models_delete(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    _models(settings)[0].delete(args.model_id)
    print(f"deleted {args.model_id}")
    return 0


# -- serve ----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from app.server import serve  # lazily: the other commands do not need FastAPI

    serve(settings)
    return 0


# -- worker ---------------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from worker.main import run  # lazily: only workers need it

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)  # a worker reports what it does
    return run(settings, burst=args.burst)
