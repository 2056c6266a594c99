"""What bounds training throughput: the LSTM's forward + backward against its matrix products alone.

    python bench/lstm_bound.py                 # the default recipe's LSTM, 1 and 2 torch threads

For one training window of the default character recipe (2 x 512 LSTM, embedding 128, batch 32,
128 steps) it times, per thread count:

- oneDNN's `nn.LSTM` forward + backward in fp32 (the plain loop's LSTM) and under bf16 autocast
  (textgen's training loop);
- textgen's own kernel (lm/kernels/train_lstm.py: the same layers through lm/kernels/csrc/lstm_train.cpp), under
  bf16 autocast, as the training loop runs it;
- the bf16 matrix products that any LSTM training kernel must do, and nothing else: the input
  projections and the weight gradients as one large product each over the window, and the
  recurrent products (forward h @ W_hh^T, backward dgates @ W_hh) one step at a time, as the
  recurrence forces. No gates, no state updates, no casts: a lower bound for a bf16 kernel built
  from torch's `@` (on the weights as they are laid out; packed once for oneDNN, they run faster).

The training target is 2x the plain fp32 loop. fp32 / (bf16 products alone) bounds what any bf16
kernel built from torch's plain products can reach; textgen's kernel shows how close it gets.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results import machine_summary, write_section  # noqa: E402

TITLE = "LSTM training kernel bound (bench/lstm_bound.py)"
T, B, E, H = 128, 32, 128, 512  # window, batch, embedding, hidden: the default recipe (lm/train.py)


def best_ms(fn: Callable[[], None], runs: int) -> float:
    fn()  # warm-up: oneDNN builds its primitives on the first call
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def onednn_lstm(bf16: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    lstm = nn.LSTM(E, H, 2, batch_first=True)
    x = torch.randn(B, T, E)

    def window() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = lstm(x)
        out.float().sum().backward()

    return window


def textgen_kernel() -> Callable[[], None]:
    from lm.kernels.train_lstm import _Recurrence

    torch.manual_seed(0)
    lstm = nn.LSTM(E, H, 2)  # time-major, as the kernel runs it
    x = torch.randn(T, B, E)
    zeros = torch.zeros(B, H)

    def window() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = x
            for layer in range(2):
                w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
                bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                out, _, _ = _Recurrence.apply(F.linear(out, w_ih), w_hh, bias, zeros, zeros)
        out.float().sum().backward()

    return window


def products_alone() -> Callable[[], None]:
    bf = torch.bfloat16
    x0, x1 = torch.randn(T * B, E, dtype=bf), torch.randn(T * B, H, dtype=bf)  # layer inputs, all steps
    w_ih0, w_ih1 = torch.randn(4 * H, E, dtype=bf), torch.randn(4 * H, H, dtype=bf)
    w_hh = torch.randn(4 * H, H, dtype=bf)
    h, dgates = torch.randn(B, H, dtype=bf), torch.randn(B, 4 * H, dtype=bf)
    dgates_all = torch.randn(T * B, 4 * H, dtype=bf)

    def window() -> None:
        x0 @ w_ih0.t(), x1 @ w_ih1.t()  # input projections, (T*B, 4H) each
        for _ in range(2 * T):  # both layers, one step at a time
            h @ w_hh.t()  # forward recurrence
            dgates @ w_hh  # backward: dh of the step before
        dgates_all.t() @ x1, dgates_all.t() @ x1  # dW_hh, both layers
        dgates_all.t() @ x0, dgates_all.t() @ x1  # dW_ih, both layers
        dgates_all @ w_ih1  # layer 1's input gradient (layer 0's output)

    return window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print, do not rewrite bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        fp32 = best_ms(onednn_lstm(bf16=False), args.runs)
        bf16 = best_ms(onednn_lstm(bf16=True), args.runs)
        ours = best_ms(textgen_kernel(), args.runs)
        products = best_ms(products_alone(), args.runs)
        rows.append(
            f"| {threads} | {fp32:.0f} ms | {bf16:.0f} ms ({fp32 / bf16:.2f}x) | {ours:.0f} ms ({fp32 / ours:.2f}x) "
            f"| {products:.0f} ms ({fp32 / products:.2f}x) |"
        )
    body = "\n".join(
        [
            f"Machine: {machine_summary()}; torch {torch.__version__}.",
            "Command: `python bench/lstm_bound.py`. One window of the default recipe's LSTM (2 x 512, "
            f"embedding {E}, batch {B}, {T} steps), forward + backward, best of {args.runs}; in brackets, "
            "the speed-up over oneDNN's fp32 LSTM.",
            "",
            "| threads | oneDNN fp32 (`nn.LSTM`) | oneDNN bf16 (`nn.LSTM` under autocast) "
            "| textgen's kernel, bf16 (the training loop) | bf16 products alone (lower bound) |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
            "The last column is every matrix product a bf16 LSTM kernel must do, through torch's `@`, with "
            "nothing else. textgen's kernel runs its per-step products on W_hh packed once per window for "
            "oneDNN (faster than `@` on the weight as it is), which is how it can come close to that column. "
            "A training step adds the embedding, the head, the loss and the optimizer (docs/TRAINING.md, "
            "'The training kernel').",
        ]
    )
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
