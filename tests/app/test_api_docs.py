"""docs/API.md keeps up with the service: every route in its route table, every setting in its settings table."""

from __future__ import annotations

import re
from pathlib import Path

from app.main import create_app
from app.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "API.md"
SCHEMA_PAGES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # FastAPI's own


def table(first_column: str) -> str:
    """The rows of the table whose header starts with `| first_column |`."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def unnamed(text: str) -> str:
    """`/models/{model_id}` and `/models/{id}` are the same route."""
    return re.sub(r"\{[^}]*\}", "{}", text)


def test_every_route_is_in_the_route_table() -> None:
    spec = create_app(Settings()).openapi()
    routes = {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}
    routes |= {"GET /", "GET /static/{path}"}  # the playground's page and files, left out of the schema
    rows = unnamed(table("route"))
    missing = sorted(route for route in routes if f"`{unnamed(route)}`" not in rows)
    assert missing == [], f"docs/API.md's route table lacks {missing}"


def test_every_setting_is_in_the_settings_table() -> None:
    rows = table("variable")
    missing = sorted(
        f"TEXTGEN_{name.upper()}" for name in Settings.model_fields if f"`TEXTGEN_{name.upper()}`" not in rows
    )
    assert missing == [], f"docs/API.md's settings table lacks {missing}"


def test_redis_is_described_as_in_use() -> None:
    assert "not used by the service yet" not in DOC.read_text(encoding="utf-8")
