"""The CPU textgen runs on: its model name, the instruction-set extensions its kernels care about, its cores.

Speed is decided by measurement on the CPU at hand (lm/decode/tune.py), and a measurement is only
valid for the CPU it was made on: this is the key that says which one, and what every benchmark
prints beside its figures.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from pathlib import Path

# The extensions the kernels and libraries choose between (oneDNN, textgen's int8 products, bf16).
FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ({} off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entries: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            entries[key.strip()] = value.strip()
    return entries


def model() -> str:
    """'Intel(R) Xeon(R) Processor', 'AMD EPYC 9R14 96-Core Processor', ... (the platform's name off Linux)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def flags() -> list[str]:
    """The FLAGS this CPU has, in FLAGS' order."""
    have = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in FLAGS if flag in have]


def cores() -> int:
    """The cores this process may use: its affinity (which a container's cpuset limits), and no more than
    a CPU quota allows (`docker run --cpus 2`, compose's `cpus:`), which torch and os.cpu_count() do
    not see: a container limited to 2 cores on a 64-core host gets 2, not 64."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    quota = _cpu_quota()
    return max(1, min(available, math.ceil(quota))) if quota is not None else available


def _cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (v2 cpu.max, else v1 cfs_quota_us / cfs_period_us); None: unlimited."""
    try:
        limit, interval = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(interval)
    except (OSError, ValueError):
        pass
    for folder in (cgroup / "cpu", cgroup / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def summary() -> str:
    """'Intel(R) Xeon(R) Processor; avx2 fma avx512f ... amx_bf16; 2 cores'."""
    return f"{model()}; {' '.join(flags()) or 'no listed extensions'}; {cores()} cores"
