"""Model aliases: list, set (compare-and-set), delete, promote and abort a canary.

`production` is the active model (`POST /models/{id}/activate` sets it too); an alias names one
model and may carry a canary, another model that serves `weight` of the routing keys.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from app.alias_schemas import AliasList, AliasPublic, AliasSet
from app.auth import require_admin_key, require_api_key
from app.deps import HolderDep
from app.errors import ApiError, error_responses, invalid
from lm.aliases import PRODUCTION, Canary, validate_alias_name
from lm.errors import AliasNotFound, ConfigError
from lm.registry import UNSET

router = APIRouter(
    prefix="/models/aliases",
    tags=["aliases"],
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 500, 503),
)


@router.get("", response_model=AliasList, dependencies=[Depends(require_api_key)])
async def list_aliases(holder: HolderDep) -> AliasList:
    """Every alias, production (the active model) included, with its canary if it has one."""
    aliases = await holder.read_aliases()
    return AliasList(data=[AliasPublic.of(a) for a in aliases.values()])


@router.put("/{alias}", response_model=AliasPublic, dependencies=[Depends(require_admin_key)])
async def set_alias(alias: str, body: AliasSet, request: Request, holder: HolderDep) -> AliasPublic:
    """Point an alias at a model, with an optional canary; loads and validates both first (compare-and-set)."""
    validate_alias_name(alias)
    if alias != PRODUCTION and await asyncio.to_thread(holder.registry.path(alias).is_dir):
        raise ApiError(409, f"{alias!r} is a model id; an alias needs a name no model has", param="alias")
    canary = None
    if body.canary is not None:
        if body.canary.model == body.model:
            raise invalid("the canary names the alias's own model; name another, or send no canary", "canary.model")
        canary = Canary(body.canary.model, body.canary.weight)
    expected = body.expected_model if "expected_model" in body.model_fields_set else UNSET
    return AliasPublic.of(await holder.set_alias(alias, body.model, canary, expected))


@router.delete("/{alias}", status_code=204, dependencies=[Depends(require_admin_key)])
async def delete_alias(alias: str, holder: HolderDep) -> Response:
    """Delete an alias (409 for production, which is the active model)."""
    await holder.delete_alias(_known(alias))
    return Response(status_code=204)


@router.post("/{alias}/promote", response_model=AliasPublic, dependencies=[Depends(require_admin_key)])
async def promote(alias: str, holder: HolderDep) -> AliasPublic:
    """The canary becomes the alias's model, for every routing key (compare-and-set)."""
    return AliasPublic.of(await holder.change_alias(_known(alias), "promote"))


@router.post("/{alias}/abort", response_model=AliasPublic, dependencies=[Depends(require_admin_key)])
async def abort(alias: str, holder: HolderDep) -> AliasPublic:
    """The canary is cleared: the alias's model serves every routing key again (compare-and-set)."""
    return AliasPublic.of(await holder.change_alias(_known(alias), "abort"))


def _known(alias: str) -> str:
    """A name that cannot be an alias is no alias: 404, as for one that does not exist."""
    try:
        return validate_alias_name(alias)
    except ConfigError:
        raise AliasNotFound(f"no alias named {alias!r}") from None
