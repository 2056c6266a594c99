"""Bodies and answers of the alias routes (app/routes/aliases.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.bodies import RequestBody
from lm.aliases import Alias


class CanarySet(RequestBody):
    model: str = Field(max_length=64, description="the model id that serves `weight` of the routing keys")
    weight: float = Field(ge=0.0, le=1.0, description="the share of routing keys the canary serves, 0.0-1.0")


class AliasSet(RequestBody):
    model: str = Field(max_length=64, description="the model id the alias names")
    canary: CanarySet | None = Field(None, description="a second version and its share; null or absent: none")
    expected_model: str | None = Field(
        None,
        max_length=64,
        description="compare-and-set: only if the alias still names this model (null: only if it does not exist "
        "yet); absent: unconditionally",
    )


class CanaryPublic(BaseModel):
    model: str
    weight: float


class AliasPublic(BaseModel):
    alias: str
    model: str
    canary: CanaryPublic | None
    updated_at: str = Field(description="ISO 8601, UTC; empty for production before any alias change set it")
    event: dict[str, Any] | None = Field(
        default=None,
        description='what the service last did to the alias by itself, at updated_at: {"kind": "canary_aborted", '
        '"reason": "failures" | "ttft", "canary": {model, weight}}; null after any other change',
    )

    @classmethod
    def of(cls, alias: Alias) -> AliasPublic:
        canary = None if alias.canary is None else CanaryPublic(model=alias.canary.model, weight=alias.canary.weight)
        return cls(alias=alias.name, model=alias.model, canary=canary, updated_at=alias.updated_at, event=alias.event)


class AliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AliasPublic]
