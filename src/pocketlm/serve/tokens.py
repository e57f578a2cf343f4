"""POST /tokenize and POST /detokenize, for clients that count tokens before they send.

One route answers both servers' shapes:
  - llama.cpp's server: `{"content": text, "add_special": false, "with_pieces": false}` ->
    `{"tokens": [ids]}` (with pieces: `[{"id", "piece"}]`); `{"tokens": [ids]}` ->
    `{"content": text}`.
  - vLLM's: `{"prompt": text, "model": ..., "add_special_tokens": true}` or
    `{"messages": [...]}` (the chat template applied) -> `{"tokens", "count",
    "max_model_len"}`; `{"tokens": [ids]}` -> `{"prompt": text}`.
The answers carry both servers' keys. Errors are OpenAI's shape, as on /v1 (vLLM's too).
Knows nothing of how tokens are computed beyond the tokenizer.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from pocketlm.serve import convert
from pocketlm.serve.fleet import Fleet
from pocketlm.serve.jobs import Served, read_body, require_key
from pocketlm.serve.schemas import ApiError, ChatMessage, _Wire, parse


class TokenizeRequest(_Wire):
    model: str | None = None
    content: str | None = None  # llama.cpp
    prompt: str | None = None  # vLLM
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # vLLM, chat
    add_special: bool | None = None  # llama.cpp's name (default false)
    add_special_tokens: bool | None = None  # vLLM's name (default true)
    with_pieces: bool = False


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[int]


def tokenize(body: TokenizeRequest, service: Served) -> dict:
    given = [body.content is not None, body.prompt is not None, body.messages is not None]
    if sum(given) != 1:
        raise ApiError("send one of 'content', 'prompt' or 'messages' to tokenize")
    tokenizer = service.tokenizer
    if body.messages is not None:
        ids, _ = convert.chat_prompt(body.messages, tokenizer)
    else:
        # Each server's own default: llama.cpp adds no special tokens unless asked, vLLM does.
        special = body.add_special if body.add_special is not None else body.add_special_tokens
        if special is None:
            special = body.prompt is not None
        ids = tokenizer.encode(
            body.content if body.content is not None else body.prompt,
            add_bos=None if special else False,
        )
    tokens: list = ids
    if body.with_pieces:
        tokens = [{"id": i, "piece": _piece(tokenizer.token_bytes(i))} for i in ids]
    return {"tokens": tokens, "count": len(ids), "max_model_len": service.context_length}


def _piece(raw: bytes) -> str | list[int]:
    """A token's text; its bytes when they are not whole UTF-8 (as llama.cpp sends them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def router(fleet: Fleet) -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_key(fleet))])

    @router.post("/tokenize")
    async def tokenize_route(request: Request) -> dict:
        body = parse(TokenizeRequest, await read_body(request, fleet.max_body))
        service, _adapter = await fleet.acquire(request, body.model)
        return await run_in_threadpool(tokenize, body, service)  # megabytes take seconds

    @router.post("/detokenize")
    async def detokenize_route(request: Request) -> dict:
        body = parse(DetokenizeRequest, await read_body(request, fleet.max_body))
        service, _adapter = await fleet.acquire(request, body.model)
        if any(not 0 <= i < service.vocab_size for i in body.tokens):
            raise ApiError(f"token ids must be in 0..{service.vocab_size - 1}", param="tokens")
        text = service.tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}

    return router
