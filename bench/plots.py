"""Shared plotting for the benchmarks: one line chart per call, written to a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def line_chart(
    path: Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    markers: str | Sequence[str] = "o",
    figsize: tuple[float, float] = (6, 4),
    log2_x: bool = False,
    hlines: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    """Plot each series (name -> y values over the shared `x`) and save the chart to `path`.

    `markers` is one marker for every series or one per series, in order. A series named "" is
    drawn but left out of the legend. `hlines` are dashed grey reference lines, label -> y.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(markers, str):
        markers = [markers] * len(series)
    fig, ax = plt.subplots(figsize=figsize)
    for (label, values), marker in zip(series.items(), markers, strict=True):
        ax.plot(x, values, marker=marker, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
