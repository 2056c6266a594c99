"""Training benchmark: quality within a wall-clock budget, and throughput against a plain loop.

On tiny-shakespeare with nanoGPT's split (first 90% train, last 10% validation), this runs
the default character recipe (`textgen train` defaults) under time budgets and reports the
validation loss in nats per character; then it measures training tokens/s of textgen's loop
against a plain fp32 `nn.LSTM` loop of the same size.

Throughput is measured in rounds; each round runs, one after the other and each in a fresh
process (so that no loop inherits another's allocator state or warm caches): the plain loop,
textgen's loop, textgen's loop with `nn.LSTM` in place of its own kernel (TEXTGEN_NATIVE=false),
and the plain loop with the allocator setting textgen's training applies (`keep_freed_memory`).
The table gives each one's median over the rounds and the median of the per-round ratios.

    python bench/train_quality.py                    # a 10- and a 20-minute run, validated every 5 minutes
    python bench/train_quality.py --budgets '' --throughput-steps 40   # throughput only
    python bench/train_quality.py --budgets 10 --other-corpora genesis,tang-poetry --jobs 2   # and other corpora
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from lm.train import TrainConfig, TrainEvent, keep_freed_memory, train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
sys.path.insert(0, str(ROOT / "bench"))
from recipe_compare import compare_and_report  # noqa: E402
from results import machine_summary, write_section  # noqa: E402


def plain_fp32_tokens_per_s(text: str, cfg: TrainConfig, steps: int, tuned_allocator: bool = False) -> float:
    """The reference: Embedding -> nn.LSTM -> Linear in fp32 with plain Adam, no tricks."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if tuned_allocator:
        keep_freed_memory()
    vocab = len(set(text)) + 1
    data = torch.tensor([ord(c) % vocab for c in text[: cfg.batch_size * 4000]]).view(cfg.batch_size, -1)
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, cfg.embedding_dim)
    lstm = nn.LSTM(cfg.embedding_dim, cfg.hidden_dim, cfg.layers, batch_first=True, dropout=cfg.dropout)
    head = nn.Linear(cfg.hidden_dim, vocab)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    state = None
    tokens, started = 0, 0.0
    for i in range(steps + 2):  # two warm-up steps are not timed
        if i == 2:
            started, tokens = time.perf_counter(), 0
        start = (i * cfg.seq_len) % (data.size(1) - cfg.seq_len - 1)
        x, y = data[:, start : start + cfg.seq_len], data[:, start + 1 : start + 1 + cfg.seq_len]
        out, state = lstm(emb(x), state)
        loss = nn.functional.cross_entropy(head(out).view(-1, vocab), y.reshape(-1))
        state = tuple(s.detach() for s in state)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        tokens += x.numel()
    return tokens / (time.perf_counter() - started)


def textgen_tokens_per_s(text: str, cfg: TrainConfig, steps: int, native: bool = True) -> float:
    events: list[TrainEvent] = []
    # warmup_steps=2 mirrors the two untimed warm-up steps of the plain loop
    run = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": steps + 2, "epochs": 1})
    result = train(text, run, on_event=events.append, progress_interval_s=0.0, native=native)
    timed = [e for e in events if e.kind == "progress"]
    if len(timed) < 3:
        return result.metrics["tokens_per_s"]
    first, last = timed[1], timed[-1]  # skip the first step (allocation warm-up)
    tokens = (last.step - first.step) * cfg.batch_size * cfg.seq_len
    return tokens / (last.elapsed_s - first.elapsed_s)


def in_fresh_process(fn, *args):  # noqa: ANN001, ANN201 - a picklable function and its arguments
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


LOOPS = {  # row label -> (function, extra arguments); the first is the reference
    "plain fp32 `nn.LSTM` loop, same size": (plain_fp32_tokens_per_s, ()),
    "textgen (`lm.train`)": (textgen_tokens_per_s, ()),
    "textgen with `nn.LSTM` instead of its own kernel (`TEXTGEN_NATIVE=false`)": (textgen_tokens_per_s, (False,)),
    "plain fp32 loop with textgen's allocator setting (`keep_freed_memory`)": (plain_fp32_tokens_per_s, (True,)),
}


def throughput_rounds(text: str, cfg: TrainConfig, steps: int, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {label: [] for label in LOOPS}
    for round_ in range(rounds):
        for label, (fn, extra) in LOOPS.items():
            rates[label].append(in_fresh_process(fn, text, cfg, steps, *extra))
        line = ", ".join(f"{label.split(' ')[0]} {r[-1]:.0f}" for label, r in rates.items())
        print(f"throughput round {round_ + 1}: {line} tok/s", flush=True)
    return rates


def quality_run(text: str, cfg: TrainConfig, minutes: float, mark_s: float) -> dict:
    """One run under a `minutes` budget; validation every `mark_s` seconds and at the end."""
    # no epochs: the budget ends the run; the sizes not set are fitted to the corpus and this budget
    run = TrainConfig.from_dict({**cfg.to_dict(), "time_budget_s": minutes * 60})
    marks: dict[int, float] = {}

    def on_event(e: TrainEvent) -> None:
        if e.kind == "validation" and e.val_loss is not None:
            minute = round(e.elapsed_s / 60)
            marks[minute] = e.val_loss
            print(f"  [{minutes:g}-min run] {e.elapsed_s:.0f}s step {e.step}: val {e.val_loss:.4f}", flush=True)

    result = train(text, run, on_event=on_event, val_every_s=mark_s)
    m = result.metrics
    marks[round(minutes)] = m["val_loss"]  # the final validation, after the learning rate has decayed
    print(f"  {minutes:g} min: val loss {m['val_loss']:.4f} after {m['steps']} steps", flush=True)
    return {
        "minutes": minutes,
        "val_loss": m["val_loss"],
        "steps": m["steps"],
        "tokens_per_s": m["tokens_per_s"],
        "epochs": m["epochs"],
        "elapsed_s": m["elapsed_s"],
        "stopped_by": m["stopped_by"],
        "marks": marks,
    }


def verdicts(quality: list[dict], ratio: float) -> list[str]:
    """The two targets, met or missed, from this run's numbers."""
    within_10 = [v for q in quality for minute, v in q["marks"].items() if minute <= 10]
    lines = []
    if within_10:
        best = min(within_10)
        state = "met" if best <= 1.38 else f"missed by {best - 1.38:.4f}"
        lines.append(f"- Validation loss <= 1.38 nats/char within 10 minutes: best {best:.4f}, **{state}**.")
    for q in quality:
        used = q["elapsed_s"] / (q["minutes"] * 60)
        state = "met" if used >= 0.95 or q["stopped_by"] == "early_stopping" else "missed"
        run = f"- The {q['minutes']:g}-minute run used {used:.1%} of its budget"
        lines.append(f"{run} (stopped by {q['stopped_by']}): **{state}**.")
    state = "met" if ratio >= 2 else "missed"
    lines.append(
        f"- Training throughput >= 2x the plain fp32 loop: {ratio:.2f}x, **{state}** "
        '(docs/TRAINING.md, "The training kernel", says what bounds it).'
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--budgets", default="10,20", help="run budgets in minutes, comma-separated ('' to skip)")
    parser.add_argument("--mark", type=float, default=300, help="validate every this many seconds (default 5 min)")
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument(
        "--other-corpora",
        default="",
        help="then compare the recipe with the previous one on these shipped corpora, as bench/recipe_compare.py "
        "does (e.g. genesis,tang-poetry)",
    )
    parser.add_argument("--other-budgets", default="2,5,10", help="their run budgets in minutes")
    parser.add_argument("--jobs", type=int, default=1, help="other corpora run side by side")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.corpus.read_text(encoding="utf-8")
    cfg = TrainConfig(threads=args.threads)
    sized, _ = cfg.fitted(text)  # the sizes the recipe fits to this corpus, which the plain loop copies
    print(f"recipe: {json.dumps(cfg.to_dict())}", flush=True)

    rates = throughput_rounds(text, sized, args.throughput_steps, args.rounds)
    reference = rates[next(iter(LOOPS))]
    ratios = {label: [r / p for r, p in zip(rs, reference, strict=True)] for label, rs in rates.items()}
    ratio = statistics.median(ratios["textgen (`lm.train`)"])
    ours = statistics.median(rates["textgen (`lm.train`)"])
    print(
        f"throughput: textgen {ours:.0f} tok/s, plain fp32 {statistics.median(reference):.0f} tok/s, "
        f"median ratio {ratio:.2f}x",
        flush=True,
    )

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    quality = [quality_run(text, cfg, minutes, args.mark) for minutes in budgets]

    mark_columns = sorted({m for q in quality for m in q["marks"]})
    lines = [
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine_summary()}. torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}.",
        f"Command: `python bench/train_quality.py --budgets {args.budgets} --mark {args.mark:g} "
        f"--throughput-steps {args.throughput_steps} --rounds {args.rounds}`",
        f"Recipe (the `textgen train` defaults): `{json.dumps(cfg.to_dict())}`",
        "",
        "Validation loss (nats/char) on the last 10% of tiny-shakespeare after N minutes of training. Each run has",
        "its own time budget (the learning rate decays to the end of that budget); marks inside a run are taken",
        "on the fly, the last one after the final decay.",
        "",
        "| run budget | " + " | ".join(f"after {m} min" for m in mark_columns) + " | steps | train tokens/s |",
        "| --- | " + " | ".join("---" for _ in mark_columns) + " | --- | --- |",
        *[
            f"| {q['minutes']:g} min | "
            + " | ".join(f"{q['marks'][m]:.4f}" if m in q["marks"] else "" for m in mark_columns)
            + f" | {q['steps']} | {q['tokens_per_s']:.0f} |"
            for q in quality
        ],
        "",
        f"Throughput: {args.rounds} rounds of {args.throughput_steps} timed steps per loop, each loop in a fresh "
        "process; medians over the rounds (per-round ratios in brackets).",
        "",
        "| training loop | tokens/s | ratio to the plain loop |",
        "| --- | --- | --- |",
        *[
            f"| {label} | {statistics.median(rates[label]):.0f} | {statistics.median(ratios[label]):.2f}x "
            f"({', '.join(f'{r:.2f}' for r in ratios[label])}) |"
            for label in LOOPS
        ],
        "",
        *verdicts(quality, ratio),
    ]
    if not args.no_write:
        write_section("Training quality and throughput (`bench/train_quality.py`)", "\n".join(lines))

    if args.other_corpora.strip():
        compare_and_report(args.other_corpora, args.other_budgets, args.jobs, args.threads, write=not args.no_write)


if __name__ == "__main__":
    main()
