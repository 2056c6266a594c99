"""Shared helpers for the benchmarks: describe the machine, rewrite one section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Each section is rewritten by the script named in its title. Ratios are measured in one run.\n"
)


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section headed `## {title}` in RESULTS.md."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- begin: {title} -->", f"<!-- end: {title} -->"
    section = f"{begin}\n## {title}\n\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
