"""The rules of docs/ARCHITECTURE.md, held to the code.

Who may import whom is a set of import-linter contracts in pyproject.toml ([tool.importlinter]); grimp
reads every import statement of every module, the lazy ones inside functions included. These tests
run them, check that they cover every package, and check the one rule that is not about imports:
the core reads no environment variable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_import_contracts_hold() -> None:
    """textgen/ > app/ | worker/ > jobs/ > lm/; lm/ imports no Redis or web library; no import circles."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_the_contracts_cover_every_package_the_project_ships() -> None:
    shipped = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    config = PYPROJECT["tool"]["importlinter"]
    assert set(config["root_packages"]) == shipped == on_disk
    layers = {name.strip() for layer in config["contracts"][0]["layers"] for name in layer.split("|")}
    assert layers == shipped  # every package has its place in the layers
    assert set(config["contracts"][2]["ancestors"]) == shipped  # and is checked for circles


def _environment_reads(path: Path, base: Path = ROOT) -> list[str]:
    """`os.environ`, `os.getenv` and their kin anywhere in a module, and `from os import` of them."""
    found, where = [], path.relative_to(base)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv"):
            found.append(f"{where}:{node.lineno} os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            names = {alias.name for alias in node.names} & {"environ", "environb", "getenv", "getenvb", "putenv"}
            found += [f"{where}:{node.lineno} from os import {name}" for name in sorted(names)]
    return found


def test_the_core_reads_no_environment_variable() -> None:
    """lm/ takes its flags as arguments; the settings classes read TEXTGEN_* (jobs/settings.py, app/settings.py)."""
    reads = [read for path in sorted((ROOT / "lm").rglob("*.py")) for read in _environment_reads(path)]
    assert reads == []


def test_the_environment_check_finds_a_read_inside_a_function(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom os import getenv\n\n\ndef native():\n    return os.environ.get('TEXTGEN_NATIVE')\n"
    )
    assert _environment_reads(probe, tmp_path) == ["probe.py:2 from os import getenv", "probe.py:6 os.environ"]
