"""docs/RELIABILITY.md: every promise points at tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "RELIABILITY.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_row_of_the_promise_tables_points_at_a_test_that_exists() -> None:
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    promises = [row for row in rows if not row.startswith(("| promise", "| limit", "| drill", "| ---"))]
    assert len(promises) >= 30
    missing = []
    for row in promises:
        references = REFERENCE.findall(row)
        assert references, f"a promise without a test: {row}"
        for file, name in references:
            if not (ROOT / file).is_file() or name not in defined_tests(ROOT / file):
                missing.append(f"{file}::{name}")
    assert not missing, missing
