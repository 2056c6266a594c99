"""Choosing the decode step by measurement, on the CPU at hand, for the model at hand.

No default fits every CPU: on one 2-core EPYC the int8 weights of the default model stay in cache and
oneDNN's int8 product is fast; on a 2-core Xeon they do not, oneDNN's one-row product streams them at
a third of the speed, and textgen's own VNNI product is 2-4x faster (docs/PERFORMANCE.md). So when an
engine starts, it measures what this CPU and this build can run, and serves with the fastest:

- every decode kind (`int8` with each of its products, `fused` fp32, the `reference` nn.LSTM), at
  batch sizes 1, 2, 4, ... up to the engine's `max_running`, and at each thread count that makes
  sense for the cores (`thread_options`);
- each kind is checked against the reference on a greedy continuation first; a kind further from it
  than its bound (`PARITY_BOUND`) is not served;
- one kind serves every batch size: a sequence's numbers must not depend on how many others run
  beside it. Within int8 the product changes with the batch size (VNNI up to `vnni_rows` rows,
  oneDNN beyond), which changes the speed and never the bits;
- the timings are cached per (CPU model and extensions, torch version, native build, architecture,
  batch sizes, thread options), so a restart or a same-shaped model's swap does not measure again;
- settings pin any part of the choice (`Pins`); what is pinned is not measured.

`tune` returns a `Plan`: the choice, why (the timings and the parity of each kind), and where it
came from ("measured", "cached" or "pinned"). `choose` is the pure choice, tested with fake timings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lm import cpu
from lm.decode.fused import FusedStep
from lm.decode.native_int8 import NativeInt8Step
from lm.decode.reference import ReferenceStep
from lm.decode.step import Step
from lm.files import atomic_write
from lm.kernels import native
from lm.model import LSTMLanguageModel

log = logging.getLogger(__name__)

KINDS = ("int8", "fused", "reference")
PRODUCTS = ("vnni", "onednn")  # int8 with its loops in C++; the Python loops are "python"
# The largest |log p(kind) - log p(reference)| over every entry of every distribution of the parity run.
# int8: 0.182 nats measured on the shipped model over 2,000 characters (docs/PERFORMANCE.md, "int8").
PARITY_BOUND = {"int8": 0.25, "fused": 1e-3, "reference": 0.0}
CACHE_VERSION = 1


@dataclass(frozen=True)
class Config:
    """One way to run the decode step: a kind, its product (int8 in C++: "vnni" | "onednn"; "-" for the
    others, "python" for int8 with its loops in Python) and the engine's torch threads."""

    kind: str
    product: str
    threads: int

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.product}/{self.threads}t"

    @classmethod
    def parse(cls, label: str) -> Config:
        kind, product, threads = label.split("/")
        return cls(kind, product, int(threads.rstrip("t")))


@dataclass(frozen=True)
class Pins:
    """Settings that fix part of the choice; None leaves it to the measurement."""

    kind: str | None = None  # TEXTGEN_DECODE
    threads: int | None = None  # TEXTGEN_THREADS
    product: str | None = None  # TEXTGEN_INT8_PRODUCT


@dataclass
class Plan:
    """What an engine serves with, and why."""

    kind: str
    loops: str  # "C++" | "Python"
    product: str  # int8 in C++: "vnni" | "onednn" | "vnni+onednn"; else as Config.product
    threads: int
    vnni_rows: int  # int8 in C++: VNNI products for batches of at most this many rows
    source: str  # "measured" | "cached" | "pinned"
    seconds: float = 0.0  # spent measuring (0 when cached or pinned)
    batches: list[int] = field(default_factory=list)
    tokens_per_s: dict[str, dict[int, float]] = field(default_factory=dict)  # Config.label -> batch -> tokens/s
    parity: dict[str, float] = field(default_factory=dict)  # kind -> worst |log p - log p(reference)|
    cpu: str = ""

    def config_at(self, batch: int) -> Config:
        """The configuration that serves a batch of this many rows."""
        product = self.product
        if self.product == "vnni+onednn":
            product = "vnni" if batch <= self.vnni_rows else "onednn"
        return Config(self.kind, product, self.threads)

    def chosen_tokens_per_s(self) -> dict[int, float]:
        """Measured tokens/s of the served configuration at each batch size."""
        out = {}
        for batch in self.batches:
            measured = self.tokens_per_s.get(self.config_at(batch).label, {})
            if batch in measured:
                out[batch] = measured[batch]
        return out

    def summary(self) -> str:
        """One line for the log: 'int8 (C++, vnni up to 8 rows then onednn), 1 thread, measured in 2.1 s: ...'."""
        product = self.product
        if product == "vnni+onednn":
            product = f"vnni up to {self.vnni_rows} rows then onednn"
        how = {"measured": f"measured in {self.seconds:.1f} s", "cached": "from the cache", "pinned": "pinned"}
        speeds = ", ".join(f"B={b} {v:,.0f}" for b, v in self.chosen_tokens_per_s().items())
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        line = f"{self.kind} ({self.loops}, {product}), {threads}, {how[self.source]}"
        return f"{line}: tokens/s {speeds}" if speeds else line

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_s"] = {k: {str(b): v for b, v in row.items()} for k, row in self.tokens_per_s.items()}
        return data


# ---------------------------------------------------------------------------- the choice


def thread_options(cores: int) -> list[int]:
    """1, 2, 4, ... and cores - 1: the engine leaves a core to the event loop, which on a busy server
    needs most of one (docs/PERFORMANCE.md, "Threads"). 2 cores: [1]."""
    options = {1}
    n = 2
    while n < cores:
        options.add(n)
        n *= 2
    if cores > 2:
        options.add(cores - 1)
    return sorted(options)


def batch_sizes(max_running: int) -> list[int]:
    """1, 2, 4, ... up to max_running, and max_running itself."""
    sizes, n = [], 1
    while n < max_running:
        sizes.append(n)
        n *= 2
    return [*sizes, max_running]


def _score(row: dict[int, float], batches: list[int]) -> float:
    """The geometric mean of tokens/s over the batch sizes: every size counts the same, in ratios."""
    if any(row.get(b, 0.0) <= 0.0 for b in batches):
        return 0.0
    return math.exp(statistics.fmean(math.log(row[b]) for b in batches))


def choose(
    tokens_per_s: dict[Config, dict[int, float]],
    parity: dict[str, float],
    batches: list[int],
    pins: Pins = Pins(),
) -> tuple[str, str, int, int]:
    """(kind, product, threads, vnni_rows) from measured tokens/s by configuration and batch size.

    Kinds outside their parity bound are left out (unless pinned). For each (kind, threads), each batch
    size takes its fastest product; the (kind, threads) with the best geometric mean over the batch
    sizes wins. int8 in C++ then serves with VNNI up to the largest batch size at which VNNI is at
    least as fast, and oneDNN beyond. ValueError when nothing measured is eligible.
    """
    allowed = [
        c
        for c in tokens_per_s
        if (pins.kind is None or c.kind == pins.kind)
        and (pins.threads is None or c.threads == pins.threads)
        and (pins.product is None or c.product not in PRODUCTS or c.product == pins.product)
        and (pins.kind == c.kind or parity.get(c.kind, math.inf) <= PARITY_BOUND[c.kind])
    ]
    if not allowed:
        raise ValueError("no measured decode configuration is eligible")
    groups: dict[tuple[str, int], list[Config]] = {}
    for c in allowed:
        groups.setdefault((c.kind, c.threads), []).append(c)

    def best_row(configs: list[Config]) -> dict[int, float]:
        return {b: max(tokens_per_s[c].get(b, 0.0) for c in configs) for b in batches}

    kind, threads = max(groups, key=lambda g: (_score(best_row(groups[g]), batches), -g[1]))
    configs = {c.product: tokens_per_s[c] for c in groups[kind, threads]}
    if set(configs) & set(PRODUCTS) != set(PRODUCTS):
        (product,) = configs  # one product measured (or pinned): it serves every size
        return kind, product, threads, max(batches) if product == "vnni" else 0
    vnni, onednn = configs["vnni"], configs["onednn"]
    vnni_rows = 0
    for b in batches:
        if vnni.get(b, 0.0) >= onednn.get(b, 0.0):
            vnni_rows = b
        else:
            break
    if vnni_rows == 0:
        return kind, "onednn", threads, 0
    if vnni_rows == max(batches):
        return kind, "vnni", threads, vnni_rows
    return kind, "vnni+onednn", threads, vnni_rows


# ---------------------------------------------------------------------------- building and measuring


def build(model: LSTMLanguageModel, config: Config, vnni_rows: int = 0) -> Step:
    """The step a configuration names (its plan applied)."""
    if config.kind == "reference":
        return ReferenceStep(model)
    if config.kind == "fused" or config.product == "python":
        return FusedStep(model, int8=config.kind == "int8")
    module = native.load()
    if module is None:
        raise RuntimeError("the native module is not built")
    step = NativeInt8Step(model, module)
    step.set_plan(vnni_rows if config.product == "vnni" else 0, config.threads)
    return step


def candidates(model: LSTMLanguageModel, pins: Pins, threads: list[int], native_loops: bool) -> list[Config]:
    """Every configuration this CPU and build can run, within the pins."""
    int8_products = ["python"]
    module = native.load() if native_loops else None
    if module is not None:
        int8_products = ["onednn", *(["vnni"] if NativeInt8Step.vnni_available(module) else [])]
    if pins.product is not None and module is not None:
        if pins.product not in int8_products:
            raise ValueError(f"the int8 product {pins.product!r} cannot run here (this CPU and build: {int8_products})")
        int8_products = [pins.product]
    kinds = [pins.kind] if pins.kind is not None else list(KINDS)
    configs = []
    for kind in kinds:
        for n in [pins.threads] if pins.threads is not None else threads:
            products = int8_products if kind == "int8" else ["-"]
            configs += [Config(kind, product, n) for product in products]
    return configs


def _time_step(step: Step, batch: int, model: LSTMLanguageModel, min_time_s: float, reps: int) -> float:
    """Tokens/s of step(tokens, h, c) for `batch` rows: the median of `reps` timed runs of at least min_time_s."""
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (batch,))
    h = torch.rand(cfg.layers, batch, cfg.hidden_dim) * 2 - 1  # |h| <= 1, as every real h
    c = torch.randn(cfg.layers, batch, cfg.hidden_dim)
    with torch.inference_mode():
        for _ in range(2):
            step(tokens, h, c)
        rates = []
        for _ in range(reps):
            n, start = 0, time.perf_counter()
            while True:
                step(tokens, h, c)
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time_s and n >= 2:
                    break
            rates.append(n * batch / elapsed)
    return statistics.median(rates)


def measure(
    model: LSTMLanguageModel, configs: list[Config], batches: list[int], *, min_time_s: float = 0.01, reps: int = 3
) -> dict[Config, dict[int, float]]:
    """Tokens/s of each configuration at each batch size, in this thread (whose torch threads it sets
    and restores). A configuration that fails to build or run is left out, with a warning."""
    before = torch.get_num_threads()
    results: dict[Config, dict[int, float]] = {}
    try:
        for config in configs:
            torch.set_num_threads(config.threads)
            try:
                step = build(model, config, vnni_rows=max(batches))
                # the reference at large batches is slow and never wins on a CPU: fewer, shorter runs
                short = config.kind == "reference"
                results[config] = {
                    b: _time_step(step, b, model, min_time_s / 2 if short else min_time_s, 1 if short else reps)
                    for b in batches
                }
            except Exception:  # a kernel that cannot run here is not a reason to stop serving
                log.warning("decode configuration %s could not be measured", config.label, exc_info=True)
    finally:
        torch.set_num_threads(before)
    return results


@torch.inference_mode()
def parity(model: LSTMLanguageModel, kind: str, *, rows: int = 4, steps: int = 48, seed: int = 0) -> float:
    """The largest |log p(kind) - log p(reference)| over every entry of `steps` distributions of `rows`
    greedy continuations (the reference's choices, fed to both), from different first tokens."""
    if kind == "reference":
        return 0.0
    config = Config(kind, "onednn" if kind == "int8" and native.load() is not None else "python", 1)
    if kind == "fused":
        config = Config("fused", "-", 1)
    candidate, reference = build(model, config), ReferenceStep(model)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (rows,), generator=generator)
    h, c = torch.zeros(cfg.layers, rows, cfg.hidden_dim), torch.zeros(cfg.layers, rows, cfg.hidden_dim)
    hr, cr = h.clone(), c.clone()
    worst = 0.0
    for _ in range(steps):
        ours = torch.log_softmax(candidate(tokens, h, c).float(), dim=-1)
        theirs = torch.log_softmax(reference(tokens, hr, cr).float(), dim=-1)
        worst = max(worst, float((ours - theirs).abs().max()))
        tokens = theirs.argmax(dim=-1)
    return worst


# ---------------------------------------------------------------------------- the cache


def cache_key(model: LSTMLanguageModel, batches: list[int], threads: list[int], native_loops: bool) -> dict[str, Any]:
    """What a measurement depends on: the CPU, the libraries and build, the model's shape, the grid."""
    module = native.module_name() if native_loops and native.load() is not None else None
    return {
        "version": CACHE_VERSION,
        "cpu": cpu.model(),
        "flags": cpu.flags(),
        "torch": torch.__version__,
        "native": module,
        "architecture": model.cfg.to_dict(),
        "batches": batches,
        "threads": threads,
    }


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"decode-{digest}.json"


def read_cache(path: Path, key: dict[str, Any]) -> tuple[dict[Config, dict[int, float]], dict[str, float]] | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        timings = {
            Config.parse(k): {int(b): float(v) for b, v in row.items()} for k, row in data["tokens_per_s"].items()
        }
        return timings, {k: float(v) for k, v in data["parity"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cache(
    path: Path, key: dict[str, Any], timings: dict[Config, dict[int, float]], parity_: dict[str, float]
) -> None:
    data = {
        "key": key,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tokens_per_s": {c.label: {str(b): v for b, v in row.items()} for c, row in timings.items()},
        "parity": parity_,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1).encode())
    except OSError as e:  # a read-only or full disk costs the next start a measurement, nothing more
        log.warning("could not cache the decode measurement in %s: %s", path.parent, e)


# ---------------------------------------------------------------------------- tune


def tune(
    model: LSTMLanguageModel,
    *,
    max_running: int,
    pins: Pins = Pins(),
    cores: int | None = None,
    native_loops: bool = True,
    cache_dir: Path | None = None,
    measure_fn: Callable[..., dict[Config, dict[int, float]]] = measure,
) -> Plan:
    """The plan for serving `model` on this CPU: measured, read from the cache, or pinned.

    A CPU model is the reference step, with nothing to choose. `cache_dir` None: no cache."""
    batches = batch_sizes(max_running)
    threads = thread_options(cores or cpu.cores())
    summary = cpu.summary()
    loops = "C++" if native_loops and native.load() is not None else "Python"
    if next(model.parameters()).device.type != "cpu":
        return Plan("reference", "Python", "-", torch.get_num_threads(), 0, "pinned", batches=batches, cpu=summary)
    configs = candidates(model, pins, threads, native_loops)
    if len(configs) == 1:  # everything pinned: nothing to measure
        (config,) = configs
        vnni_rows = max(batches) if config.product == "vnni" else 0
        loops = "C++" if config.product in PRODUCTS else "Python"
        return Plan(
            config.kind, loops, config.product, config.threads, vnni_rows, "pinned", batches=batches, cpu=summary
        )
    key = cache_key(model, batches, threads, native_loops)
    path = cache_file(cache_dir, key) if cache_dir is not None else None
    cached = read_cache(path, key) if path is not None else None
    started = time.perf_counter()
    if cached is not None and all(c in cached[0] for c in configs):
        timings, parity_, source = cached[0], cached[1], "cached"
    else:
        timings = measure_fn(model, configs, batches)
        kinds = sorted({c.kind for c in timings})
        parity_ = {kind: parity(model, kind) for kind in kinds}
        source = "measured"
        if path is not None:
            write_cache(path, key, timings, parity_)
    seconds = time.perf_counter() - started if source == "measured" else 0.0
    timings = {c: row for c, row in timings.items() if c in configs}
    kind, product, n, vnni_rows = choose(timings, parity_, batches, pins)
    loops = "C++" if kind == "int8" and product in (*PRODUCTS, "vnni+onednn") else "Python"
    return Plan(
        kind,
        loops,
        product,
        n,
        vnni_rows,
        source,
        seconds=seconds,
        batches=batches,
        tokens_per_s={c.label: row for c, row in timings.items()},
        parity=parity_,
        cpu=summary,
    )


def build_planned(model: LSTMLanguageModel, plan: Plan) -> Step:
    """The step a plan serves with."""
    if plan.kind == "int8" and plan.loops == "C++":
        product = "vnni" if plan.vnni_rows > 0 else "onednn"
        return build(model, Config("int8", product, plan.threads), vnni_rows=plan.vnni_rows)
    return build(model, Config(plan.kind, "python" if plan.kind == "int8" else "-", plan.threads))
