"""Choosing the decode step by measurement (lm/decode/tune.py): the choice from fake timings on any
machine, the cache, the pins, and a real measurement of a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm.decode import build_step
from lm.decode.tune import (
    Config,
    Pins,
    batch_sizes,
    build_planned,
    cache_file,
    cache_key,
    choose,
    thread_options,
    tune,
)
from lm.kernels import native
from lm.model import LSTMLanguageModel, ModelConfig

BATCHES = [1, 2, 4, 8, 16, 32]
GOOD = {"int8": 0.12, "fused": 1e-5, "reference": 0.0}  # parity within every bound


def rates(*values: float) -> dict[int, float]:
    return dict(zip(BATCHES, values, strict=True))


def test_the_fastest_kind_serves_and_each_batch_size_takes_its_fastest_product() -> None:
    timings = {
        Config("int8", "onednn", 1): rates(2500, 5800, 11500, 20700, 35400, 52500),
        Config("int8", "vnni", 1): rates(4900, 9500, 17600, 22900, 28500, 32300),  # faster up to 8 rows
        Config("fused", "-", 1): rates(1100, 2100, 4000, 7400, 10000, 12800),
        Config("reference", "-", 1): rates(300, 850, 1750, 3500, 5600, 8100),
    }
    assert choose(timings, GOOD, BATCHES) == ("int8", "vnni+onednn", 1, 8)


def test_vnni_alone_or_onednn_alone_when_one_wins_everywhere() -> None:
    fast = rates(9, 9, 9, 9, 9, 9)
    slow = rates(1, 1, 1, 1, 1, 1)
    both = {Config("int8", "vnni", 1): fast, Config("int8", "onednn", 1): slow}
    assert choose(both, GOOD, BATCHES) == ("int8", "vnni", 1, 32)
    both = {Config("int8", "vnni", 1): slow, Config("int8", "onednn", 1): fast}
    assert choose(both, GOOD, BATCHES) == ("int8", "onednn", 1, 0)


def test_the_thread_count_with_the_best_geometric_mean_over_batch_sizes_wins() -> None:
    timings = {
        Config("int8", "onednn", 1): rates(3000, 6000, 12000, 20000, 30000, 40000),
        Config("int8", "onednn", 2): rates(2000, 4000, 9000, 21000, 40000, 60000),  # only big batches gain
        Config("int8", "onednn", 4): rates(1000, 2000, 4000, 8000, 16000, 32000),
    }
    assert choose(timings, GOOD, BATCHES)[2] == 1
    timings[Config("int8", "onednn", 2)] = rates(2900, 6100, 13000, 26000, 45000, 70000)
    assert choose(timings, GOOD, BATCHES)[2] == 2


def test_a_kind_outside_its_parity_bound_is_not_served() -> None:
    timings = {
        Config("int8", "onednn", 1): rates(5000, 9000, 15000, 25000, 35000, 45000),
        Config("fused", "-", 1): rates(1000, 2000, 4000, 7000, 10000, 12000),
    }
    assert choose(timings, GOOD, BATCHES)[0] == "int8"
    assert choose(timings, {**GOOD, "int8": 0.9}, BATCHES)[0] == "fused"  # 0.9 nats from the reference
    assert choose(timings, {"fused": 1e-5}, BATCHES)[0] == "fused"  # int8's parity unknown: not served


def test_a_kernel_that_could_not_run_is_simply_not_among_the_timings() -> None:
    """measure() leaves out a configuration that fails to build or run; the choice takes what remains."""
    timings = {Config("fused", "-", 1): rates(1000, 2000, 4000, 7000, 10000, 12000)}
    assert choose(timings, GOOD, BATCHES) == ("fused", "-", 1, 0)
    with pytest.raises(ValueError, match="no measured"):
        choose({}, GOOD, BATCHES)


def test_pins_restrict_the_choice() -> None:
    timings = {
        Config("int8", "onednn", 1): rates(2500, 5800, 11500, 20700, 35400, 52500),
        Config("int8", "vnni", 1): rates(4900, 9500, 17600, 22900, 28500, 32300),
        Config("int8", "vnni", 2): rates(9000, 15000, 25000, 30000, 33000, 35000),
        Config("fused", "-", 1): rates(1100, 2100, 4000, 7400, 10000, 12800),
    }
    assert choose(timings, GOOD, BATCHES, Pins(kind="fused")) == ("fused", "-", 1, 0)
    assert choose(timings, GOOD, BATCHES, Pins(product="onednn")) == ("int8", "onednn", 1, 0)
    assert choose(timings, GOOD, BATCHES, Pins(threads=2)) == ("int8", "vnni", 2, 32)
    # a pinned kind is served even outside its bound: the operator asked for it
    assert choose(timings, {**GOOD, "int8": 0.9}, BATCHES, Pins(kind="int8"))[0] == "int8"


def test_thread_options_leave_a_core_to_the_event_loop() -> None:
    assert thread_options(1) == [1]
    assert thread_options(2) == [1]
    assert thread_options(4) == [1, 2, 3]
    assert thread_options(16) == [1, 2, 4, 8, 15]
    assert batch_sizes(32) == BATCHES and batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48] and batch_sizes(1) == [1]


# ---------------------------------------------------------------------------- tune, with the cache


def tiny(hidden: int = 16) -> LSTMLanguageModel:
    torch.manual_seed(0)
    return LSTMLanguageModel(ModelConfig(40, embedding_dim=8, hidden_dim=hidden, layers=2, dropout=0.0)).eval()


class FakeMeasure:
    """measure() with fixed timings, counting its calls: int8 fastest, VNNI up to 2 rows."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: LSTMLanguageModel, configs: list[Config], batches: list[int]) -> dict:
        self.calls += 1
        speed = {"vnni": 4.0, "onednn": 2.0, "python": 1.5, "-": 1.0}
        out = {}
        for c in configs:
            boost = 2.0 if c.product == "onednn" and c.kind == "int8" else 1.0
            out[c] = {
                b: speed[c.product] * 1000 * b * (boost if b > 2 else 1.0) / (10 if c.kind == "reference" else 1)
                for b in batches
            }
        return out


def test_tune_measures_once_then_reads_the_cache(tmp_path: Path) -> None:
    fake = FakeMeasure()
    first = tune(tiny(), max_running=8, cores=2, cache_dir=tmp_path, measure_fn=fake)
    assert first.source == "measured" and fake.calls == 1
    assert first.kind == "int8" and first.threads == 1 and first.parity["int8"] < 0.25
    again = tune(tiny(), max_running=8, cores=2, cache_dir=tmp_path, measure_fn=fake)
    assert again.source == "cached" and fake.calls == 1  # a restart, or a same-shaped model: no measuring
    assert (again.kind, again.product, again.vnni_rows) == (first.kind, first.product, first.vnni_rows)
    other = tune(tiny(hidden=24), max_running=8, cores=2, cache_dir=tmp_path, measure_fn=fake)
    assert other.source == "measured" and fake.calls == 2  # another shape is measured


def test_a_broken_cache_file_is_measured_again_and_an_unwritable_one_only_costs_the_cache(tmp_path: Path) -> None:
    fake = FakeMeasure()
    model = tiny()
    tune(model, max_running=8, cores=2, cache_dir=tmp_path, measure_fn=fake)
    key = cache_key(model, batch_sizes(8), thread_options(2), True)
    cache_file(tmp_path, key).write_text("{not json")
    assert tune(model, max_running=8, cores=2, cache_dir=tmp_path, measure_fn=fake).source == "measured"
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a file where the folder should be: the cache cannot be written
    plan = tune(model, max_running=8, cores=2, cache_dir=blocked / "sub", measure_fn=fake)
    assert plan.source == "measured" and plan.kind == "int8"


def test_a_fully_pinned_plan_measures_nothing(tmp_path: Path) -> None:
    fake = FakeMeasure()
    plan = tune(tiny(), max_running=8, cores=2, pins=Pins(kind="fused", threads=1), measure_fn=fake)
    assert (plan.kind, plan.source, fake.calls) == ("fused", "pinned", 0)


def test_the_cache_holds_the_timings_the_parity_and_the_key(tmp_path: Path) -> None:
    model = tiny()
    plan = tune(model, max_running=8, cores=2, cache_dir=tmp_path, measure_fn=FakeMeasure())
    [path] = tmp_path.iterdir()
    data = json.loads(path.read_text())
    assert data["key"]["architecture"] == model.cfg.to_dict() and data["key"]["cpu"]
    assert set(data["tokens_per_s"]) == set(plan.tokens_per_s) and set(data["parity"]) == set(plan.parity)


# ---------------------------------------------------------------------------- a real measurement


def test_a_real_measurement_serves_a_step_with_the_same_bits_as_the_pinned_kind() -> None:
    model = tiny()
    plan = tune(model, max_running=4, cores=2)
    assert plan.source == "measured" and plan.seconds > 0
    assert set(plan.parity) >= {"int8", "fused", "reference"} and plan.parity["fused"] < 1e-3
    assert plan.kind in ("int8", "fused")  # the reference never wins on a CPU
    assert plan.summary().startswith(plan.kind)
    served, pinned = build_planned(model, plan), build_step(model, plan.kind)
    tokens = torch.tensor([3, 7, 11])
    h = torch.rand(2, 3, 16) * 2 - 1
    c = torch.randn(2, 3, 16)
    h2, c2 = h.clone(), c.clone()
    assert torch.equal(served(tokens, h, c), pinned(tokens, h2, c2)) and torch.equal(h, h2)
    if plan.kind == "int8" and native.load() is not None:
        assert plan.loops == "C++"


def test_the_cpu_quota_of_a_container_is_read_from_its_cgroup(tmp_path: Path) -> None:
    from lm.cpu import _cpu_quota, cores, flags, summary

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert _cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert _cpu_quota(tmp_path / "v1") == 2.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cpu_quota(tmp_path / "v1") is None
    assert _cpu_quota(tmp_path / "nothing-here") is None
    assert cores() >= 1 and str(cores()) in summary() and all(flag in summary() for flag in flags())
