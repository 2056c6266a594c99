"""The default recipe against the previous one, on corpora that are not Shakespeare, in one session.

For each shipped corpus named and each budget (minutes), two runs one after the other on the same
machine: the previous default recipe (fixed sizes 128/512x2, dropout 0.2, untied, every symbol kept,
10 epochs as a cap, no AWD-LSTM regularisers, lr 6e-3, weight decay 0.01), and today's (`textgen train`
defaults: sizes fitted to the corpus and the budget, AR/TAR and locked dropout, lr 8e-3, weight decay
0.1, the budget alone ending the run). Each run
validates on the corpus's last 10%; the table gives the validation loss in nats per character (per
token for word and BPE: these are char runs) and what each run did.

    python bench/recipe_compare.py                                  # genesis and tang-poetry, 2, 5 and 10 minutes
    python bench/recipe_compare.py --corpora genesis --budgets 2    # one corpus, one budget
    python bench/recipe_compare.py --budgets 5,10 --jobs 2          # both corpora at once, a core each

The previous recipe runs through today's code with its old settings, so both keep their best epoch's
weights (the previous code kept the last; with 10 epochs at most and a decaying rate these rarely differ).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lm.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results import machine_summary, write_section  # noqa: E402

# The `textgen train` defaults before the fitted recipe (commit 10379e7 and earlier).
PREVIOUS: dict[str, Any] = {
    "embedding_dim": 128,
    "hidden_dim": 512,
    "layers": 2,
    "dropout": 0.2,
    "tie_weights": False,
    "epochs": 10,
    "ar": 0.0,
    "tar": 0.0,
    "locked_dropout": False,
    "lr": 6e-3,
    "weight_decay": 0.01,
}


def run(name: str, text: str, minutes: float, recipe: str, threads: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"time_budget_s": minutes * 60, "threads": threads}
    if recipe == "previous":
        fields |= {**PREVIOUS, "vocab_size": len(set(text)) + 1}  # every symbol kept, as the previous recipe did
    result = train(text, TrainConfig.from_dict(fields))
    m = result.metrics
    cfg = result.config
    print(
        f"  {name}, {recipe}, {minutes:g} min: val loss {m['val_loss']:.4f} after {m['steps']} steps, "
        f"{m['epochs']} epochs, stopped by {m['stopped_by']}",
        flush=True,
    )
    return {
        "val_loss": m["val_loss"],
        "val_bits_per_char": m.get("val_bits_per_char"),
        "steps": m["steps"],
        "epochs": m["epochs"],
        "stopped_by": m["stopped_by"],
        "elapsed_s": m["elapsed_s"],
        "model": f"{cfg.layers}x{cfg.hidden_dim}, emb {cfg.embedding_dim}{', tied' if cfg.tie_weights else ''}, "
        f"dropout {cfg.dropout:g}, {sum(p.numel() for p in result.model.parameters()):,} parameters",
    }


def compare(name: str, budgets: list[float], threads: int) -> list[tuple[str, int, float, dict, dict]]:
    """One corpus: the previous recipe, then today's, at each budget."""
    text = (ROOT / "data" / name / f"{name}.txt").read_text(encoding="utf-8")
    print(f"{name}: {len(text):,} characters, {len(set(text)):,} symbols", flush=True)
    rows = []
    for minutes in budgets:
        previous = run(name, text, minutes, "previous", threads)
        fitted = run(name, text, minutes, "fitted", threads)
        rows.append((name, len(text), minutes, previous, fitted))
    return rows


TITLE = "The recipe against the previous one on other corpora (`bench/recipe_compare.py`)"


def compare_corpora(corpora: list[str], budgets: list[float], jobs: int, threads: int | None) -> str:
    """Run the comparison on each corpus (`jobs` of them side by side) and return its RESULTS.md section."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs > 1:  # the corpora side by side, each in its own process with its share of the cores
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            rows = [row for rows in pool.starmap(compare, [(n, budgets, threads) for n in corpora]) for row in rows]
    else:
        rows = [row for name in corpora for row in compare(name, budgets, threads)]
    side_by_side = f", {jobs} corpora side by side" if jobs > 1 else ""
    lines = [
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine_summary()}. torch {torch.__version__}, "
        f"{threads} thread(s) a run{side_by_side}, Python {platform.python_version()}.",
        f"Command: `python bench/recipe_compare.py --corpora {','.join(corpora)} --budgets "
        f"{','.join(f'{b:g}' for b in budgets)}" + (f" --jobs {jobs}`" if jobs > 1 else "`"),
        f"Previous recipe: `{json.dumps(PREVIOUS)}` and every symbol kept; today's: the `textgen train` defaults.",
        "",
        "Validation loss (nats/char) on each corpus's last 10%, each run under its own budget, the two recipes",
        "back to back:",
        "",
        "| corpus | budget | previous recipe | today's recipe | change | today's model | steps (prev / today) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {name} ({chars / 1e3:,.0f}K chars) | {minutes:g} min | {p['val_loss']:.4f} | {f['val_loss']:.4f} | "
            f"{f['val_loss'] - p['val_loss']:+.4f} | {f['model']} | {p['steps']} / {f['steps']} |"
            for name, chars, minutes, p, f in rows
        ],
        "",
        f"Today's recipe is better in {sum(f['val_loss'] < p['val_loss'] for *_, p, f in rows)} of {len(rows)} runs.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", default="genesis,tang-poetry", help="shipped corpora (data/<name>/<name>.txt)")
    parser.add_argument("--budgets", default="2,5,10", help="run budgets in minutes, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads a run (default: the cores / --jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="corpora run side by side (each pair stays back to back)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    compare_and_report(args.corpora, args.budgets, args.jobs, args.threads, write=not args.no_write)


def compare_and_report(corpora: str, budgets: str, jobs: int, threads: int | None, *, write: bool) -> None:
    """The comparison on comma-separated `corpora` and `budgets` (minutes), printed and, with `write`, in
    bench/RESULTS.md; bench/train_quality.py --other-corpora calls it too."""
    names = [c.strip() for c in corpora.split(",") if c.strip()]
    section = compare_corpora(names, [float(b) for b in budgets.split(",") if b.strip()], jobs, threads)
    print(section, flush=True)
    if write:
        write_section(TITLE, section)


if __name__ == "__main__":
    main()
