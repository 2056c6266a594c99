"""The model registry: list, show, activate (hot swap in this process), delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from app.auth import is_admin, require_admin_key, require_api_key
from app.deps import HolderDep
from app.errors import error_responses
from app.holder import ModelHolder
from app.schemas import ModelDetail, ModelList, ModelPublic, UnreadableModel
from lm.aliases import PRODUCTION
from lm.registry import ModelInfo

router = APIRouter(
    prefix="/models", tags=["models"], responses=error_responses(400, 401, 403, 404, 409, 413, 422, 500, 503, 507)
)


def model_public(info: ModelInfo, holder: ModelHolder) -> ModelPublic:
    return ModelPublic(
        id=info.model_id,
        created_at=info.created_at,
        parameters=info.parameters,
        tokenizer=info.tokenizer,
        metrics=info.metrics,
        active=info.active,
        loaded=info.model_id in holder.loaded_ids(),
        size_bytes=info.size_bytes,
    )


def model_detail(info: ModelInfo, holder: ModelHolder) -> ModelDetail:
    config = info.config
    return ModelDetail(
        **model_public(info, holder).model_dump(),
        architecture=config.get("architecture", {}),
        training=info.training,
        chat_template=config.get("chat_template", {}),
        versions=config.get("versions", {}),
        decode=holder.decode_plan(info.model_id),
    )


@router.get("", response_model=ModelList, dependencies=[Depends(require_api_key)])
async def list_models(request: Request, holder: HolderDep) -> ModelList:
    """Every model in the registry, newest first; for admin keys, also the folders that cannot be read."""
    infos, unreadable = await asyncio.to_thread(holder.registry.scan)
    active = await asyncio.to_thread(holder.registry.active_id)
    return ModelList(
        active=active,
        models=[model_public(i, holder) for i in infos],
        unreadable=[UnreadableModel(id=u.name, reason=u.reason) for u in unreadable] if is_admin(request) else None,
    )


@router.get("/{model_id}", response_model=ModelDetail, dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, holder: HolderDep) -> ModelDetail:
    """One model: architecture, tokenizer, training recipe, metrics, chat template."""
    return model_detail(await holder.info(model_id), holder)


@router.post("/{model_id}/activate", response_model=ModelDetail, dependencies=[Depends(require_admin_key)])
async def activate_model(model_id: str, holder: HolderDep) -> ModelDetail:
    """Load, validate and swap in a model (= PUT /models/aliases/production); running requests finish on the old one."""
    await holder.set_alias(PRODUCTION, model_id, None)
    return model_detail(await holder.info(model_id), holder)


@router.delete("/{model_id}", status_code=204, dependencies=[Depends(require_admin_key)])
async def delete_model(model_id: str, holder: HolderDep) -> Response:
    """Delete a model that is not active."""
    await holder.delete(model_id)
    return Response(status_code=204)
