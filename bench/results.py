"""Shared helpers for the benchmarks: describe the machine, rewrite one section of RESULTS.md.

RESULTS.md keeps one part per CPU model (`## CPU: <model>`), and in it one section per benchmark:
figures from different hosts are never mixed, and a ratio is only ever between numbers of one run.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lm import cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "One part per CPU model the benchmarks ran on; in it, each section is rewritten by the script named in\n"
    "its title. Ratios are measured in one run, on one machine.\n"
)


def machine_summary() -> str:
    """'Intel(R) Xeon(R) Processor; avx2 fma ... amx_bf16; 2 cores, 24 GiB, Linux 6.1'."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu.summary()}, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def cpu_slug(model: str | None = None) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-r-xeon-r-processor': a folder name for this CPU's figures."""
    return re.sub(r"[^a-z0-9]+", "-", (model or cpu.model()).lower()).strip("-") or "cpu"


def figure(name: str) -> tuple[Path, str]:
    """Where a benchmark saves a figure for this CPU, and the link RESULTS.md uses for it."""
    relative = f"figures/{cpu_slug()}/{name}"
    path = RESULTS.parent / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, relative


def write_section(title: str, body: str, path: Path = RESULTS, cpu_model: str | None = None) -> None:
    """Replace (or add) the section `### {title}` in this CPU's part of RESULTS.md (the part is added
    at the end the first time a CPU is seen). The section opens with the date it was measured."""
    model = cpu_model or cpu.model()
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- begin: {title} @ {model} -->", f"<!-- end: {title} @ {model} -->"
    body = body.strip()
    if not body.startswith("Date:"):
        body = f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n{body}"
    section = f"{begin}\n### {title}\n\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        path.write_text(pattern.sub(lambda _: section, text))
        return
    part = f"<!-- cpu: {model} -->"
    if part not in text:
        text = text.rstrip() + f"\n\n{part}\n## CPU: {model}\n"
    start = text.index(part)
    following = text.find("<!-- cpu: ", start + len(part))
    stop = len(text) if following < 0 else following
    text = text[:stop].rstrip() + "\n\n" + section + "\n" + ("\n" + text[stop:] if following >= 0 else "")
    path.write_text(text)
