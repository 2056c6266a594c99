"""The tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

POST /tokenize answers textgen's `{"text"}` with ids and each token's text, and vLLM's `{"prompt"}` or
`{"messages"}` with vLLM's shape, so that remote-tokenizer clients (lm-evaluation-harness's
`tokenizer_backend=remote`) work unmodified against textgen. `model` picks the model on each route.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, Depends, Query, Request

from app.auth import require_api_key
from app.chat import jinja_chat_template, render_chat
from app.deps import HolderDep, SettingsDep
from app.errors import error_responses, invalid
from app.generation import check_prompt, lease_model
from app.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizePromptResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from app.settings import Settings
from lm.sampler import prompt_ids
from lm.tokenizers import UNK_TOKEN, BPETokenizer, Tokenizer

router = APIRouter(
    tags=["generation"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 500, 503),
)


@router.post("/tokenize", response_model=TokenizeResponse | TokenizePromptResponse)
async def tokenize(
    body: TokenizeRequest, request: Request, holder: HolderDep, settings: SettingsDep
) -> TokenizeResponse | TokenizePromptResponse:
    """Token ids with the model's own tokenizer: textgen's shape for `text`, vLLM's for `prompt` or `messages`."""
    given = [name for name in ("text", "prompt", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise invalid("give one of text, prompt (vLLM's) or messages (vLLM's)", given[-1] if given else "text", request)
    if body.messages is None:
        check_prompt(body.text if body.text is not None else body.prompt or "", settings, request, given[0])
    lease = await lease_model(holder, request, body.model)
    try:
        tokenizer = lease.loaded.checkpoint.tokenizer
        if body.text is not None:
            ids = tokenizer.encode(body.text)
            return TokenizeResponse(model=lease.model_id, ids=ids, tokens=_pieces(tokenizer, ids), count=len(ids))
        text = body.prompt
        if body.messages is not None:
            text, _ = render_chat(
                lease.loaded.chat_template, body.messages, add_generation_prompt=body.add_generation_prompt
            )
            check_prompt(text, settings, request, "messages")
        ids = tokenizer.encode(text or "")
        return TokenizePromptResponse(
            tokens=ids,
            count=len(ids),
            max_model_len=max_model_len(tokenizer, settings),
            token_strs=_pieces(tokenizer, ids) if body.return_token_strs else None,
        )
    finally:
        lease.release()


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request, holder: HolderDep) -> DetokenizeResponse:
    """The text of token ids (vLLM's route)."""
    lease = await lease_model(holder, request, body.model)
    try:
        tokenizer = lease.loaded.checkpoint.tokenizer
        vocab = tokenizer.vocab_size
        for i, token_id in enumerate(body.tokens):
            if not 0 <= token_id < vocab:
                message = f"tokens.{i} is {token_id}, outside the vocabulary (ids 0 to {vocab - 1})"
                raise invalid(message, "tokens", request)
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))
    finally:
        lease.release()


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(
    request: Request,
    holder: HolderDep,
    settings: SettingsDep,
    model: str | None = Query(None, description="model id; default: the active model"),
) -> TokenizerInfo:
    """The tokenizer's special tokens, length limit and chat template as Jinja (vLLM's route)."""
    lease = await lease_model(holder, request, model)
    try:
        tokenizer = lease.loaded.checkpoint.tokenizer
        return TokenizerInfo(
            model=lease.model_id,
            tokenizer_class=type(tokenizer).__name__,
            kind=tokenizer.kind,  # type: ignore[arg-type]
            vocab_size=tokenizer.vocab_size,
            # the start of an empty prompt (lm.sampler.prompt_ids): "\n", or U+FFFD where "\n" is unknown
            bos_token=tokenizer.decode(prompt_ids(tokenizer, "")),
            eos_token=None,
            pad_token=None,
            unk_token=UNK_TOKEN,
            model_max_length=max_model_len(tokenizer, settings),
            chat_template=jinja_chat_template(lease.loaded.chat_template),
        )
    finally:
        lease.release()


def max_model_len(tokenizer: Tokenizer, settings: Settings) -> int:
    """How many prompt tokens the server takes, whatever the tokens are.

    An LSTM has no context limit: its state has the same size after any number of tokens. The one limit
    is the server's, TEXTGEN_MAX_PROMPT_CHARS, which counts characters, and a token is at most
    `_longest_token(tokenizer)` of them; generated tokens have their own cap (TEXTGEN_MAX_TOKENS) and
    take nothing from the prompt's. (A word tokenizer's unknown token stands for one unknown word of any
    length: it is counted as one character.)"""
    return max(1, settings.max_prompt_chars // _longest_token(tokenizer))


@functools.lru_cache(maxsize=16)  # one per loaded model version
def _longest_token(tokenizer: Tokenizer) -> int:
    """The most characters one token adds to a text: a byte-level BPE token, its bytes (a character is
    at least one); a char or word token, its text (the unknown token counted as one)."""
    if isinstance(tokenizer, BPETokenizer):
        return max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    pieces = (tokenizer.token_bytes(i).decode("utf-8") for i in range(tokenizer.vocab_size) if i != tokenizer.unk_id)
    return max((len(piece) for piece in pieces), default=1)


def _pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
