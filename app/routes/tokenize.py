"""POST /tokenize: how a model's tokenizer splits a text."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.auth import may_load, require_api_key
from app.deps import HolderDep, SettingsDep
from app.errors import error_responses
from app.generation import check_prompt
from app.schemas import TokenizeRequest, TokenizeResponse

router = APIRouter(
    tags=["generation"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 500, 503),
)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeRequest, request: Request, holder: HolderDep, settings: SettingsDep
) -> TokenizeResponse:
    """Token ids and the text of each token, with the model's own tokenizer."""
    check_prompt(body.text, settings, request, "text")
    lease = await holder.lease(body.model, may_load=may_load(request, body.model))
    try:
        tokenizer = lease.loaded.checkpoint.tokenizer
        ids = tokenizer.encode(body.text)
        pieces = [tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
        return TokenizeResponse(model=lease.model_id, ids=ids, tokens=pieces, count=len(ids))
    finally:
        lease.release()
