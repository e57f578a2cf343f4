"""Anthropic's Messages API on the same engine: POST /v1/messages (streamed and not) and
/v1/messages/count_tokens, for programs written against the `anthropic` client.

A request becomes the same engine request as a chat completion (`jobs.Jobs` on the
server's scheduler, `convert.sampling_params`, `convert.chat_prompt`,
`convert.token_budget`); the answer is a `message` with one text block, or the stream of
events message_start, content_block_start, ping, content_block_delta..., content_block_stop,
message_delta, message_stop. `stop_reason` is end_turn (the model ended its turn),
max_tokens, or stop_sequence (with the `stop_sequence` that matched). Failures come in
Anthropic's shape, {"type": "error", "error": {"type", "message"}}; a failure after a
stream has begun is an `error` event. A last assistant message is continued (Anthropic's
"prefill"). `output_config.format` (a JSON schema) is enforced by the engine's
constrained decoding. Tools are refused with a clear 400 for now: the engine's tool calling
(serve/tools.py, on the OpenAI route) is not mapped to Anthropic's tool_use blocks yet.
Knows nothing of how tokens are computed. (docs.anthropic.com: Messages, Streaming
Messages, Errors.)
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar
from pocketlm.generate.params import GenerationParams
from pocketlm.serve import convert
from pocketlm.serve.fleet import Fleet
from pocketlm.serve.guard import authorized
from pocketlm.serve.jobs import Jobs, Served, collect, read_body
from pocketlm.serve.schemas import ApiError, ChatMessage, SamplingKnobs, _Wire, parse

# HTTP status -> Anthropic's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}

# -- wire schemas -------------------------------------------------------------------------------


class Message(_Wire):
    role: Literal["user", "assistant"]
    content: str | list[dict]  # text blocks; others are refused by name in `text_of`


class CountTokensRequest(_Wire):
    """POST /v1/messages/count_tokens; the prompt part of a Messages request."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[dict] | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict | None = None
    tool_choice: dict | None = None
    thinking: dict | None = None
    # {"format": {"type": "json_schema", "schema": {...}}}: structured outputs
    output_config: dict | None = None


# -- requests -> engine -------------------------------------------------------------------------


def text_of(content: str | list[dict], *, where: str) -> str:
    """The text of a message's content: a string, or text blocks joined."""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        kind = block.get("type")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise ApiError(
                f"{where}.content.{i}: only text content blocks are supported (got {kind!r})"
            )
        parts.append(block["text"])
    return "".join(parts)


def prompt(body: CountTokensRequest, service: Served) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, extra stops): the model's chat template (or the transcript harness)
    over the system prompt and messages; a last assistant message is continued."""
    if body.tools:
        raise ApiError("tools (tool use) are not supported yet")
    texts = [text_of(m.content, where=f"messages.{i}") for i, m in enumerate(body.messages)]
    # too many bytes to fit: refused before rendering and tokenizing
    service.check_prompt_bytes(["".join(texts)], param="messages")
    messages = []
    if body.system:
        messages.append(ChatMessage(role="system", content=text_of(body.system, where="system")))
    for i, m in enumerate(body.messages):
        messages.append(ChatMessage(role=m.role, content=text_of(m.content, where=f"messages.{i}")))
    prefill = messages.pop().content if messages[-1].role == "assistant" else None
    if not any(m.role == "user" for m in messages):
        raise ApiError("messages: the conversation needs a user message")
    ids, extra = convert.chat_prompt(messages, service.tokenizer)
    if prefill:
        # Anthropic strips the prefill's trailing whitespace and so do we: a trailing
        # space would make the model start a word with a second one.
        ids = ids + service.tokenizer.encode(prefill.rstrip(), add_bos=False)
    return ids, extra


def generation_params(
    body: MessagesRequest, *, budget: int, extra_stops: tuple[str, ...], vocab_size: int
) -> GenerationParams:
    if body.thinking and body.thinking.get("type") == "enabled":
        raise ApiError("thinking is not supported by this model")
    stops = tuple(body.stop_sequences or ())
    if any(not s for s in stops):
        raise ApiError("stop_sequences must not be empty strings")
    sampling = convert.sampling_params(
        SamplingKnobs(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        vocab_size=vocab_size,
    )
    grammar = output_grammar((body.output_config or {}).get("format"))
    return GenerationParams(
        sampling, max_tokens=budget, stop=(*stops, *extra_stops), grammar=grammar
    )


def output_grammar(format: object) -> Grammar | None:
    """The grammar of `output_config.format`, {"type": "json_schema", "schema": {...}}: JSON
    valid under the schema (one the constraint cannot enforce is a 400 naming what it uses)."""
    if format is None:
        return None
    if not (isinstance(format, dict) and format.get("type") == "json_schema"):
        raise ApiError('output_config.format must be {"type": "json_schema", "schema": {...}}')
    if not isinstance(format.get("schema"), dict):
        raise ApiError("output_config.format.schema must be a JSON schema (an object)")
    try:
        return Grammar.json_schema(format["schema"])
    except PocketLMError as error:
        raise ApiError(f"output_config.format: {error}") from None


# -- engine -> answers --------------------------------------------------------------------------


def stop_reason(
    finish_reason: str | None, matched: str | None, stops: list[str] | None
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): a stop string the request gave is stop_sequence; the
    model's end of turn (end-of-text, or the transcript's next "User:") is end_turn."""
    if finish_reason == "stop" and matched is not None and matched in (stops or ()):
        return "stop_sequence", matched
    return STOP_REASONS.get(finish_reason or "stop", "end_turn"), None


def message(
    *, id: str, model: str, text: str | None, reason: tuple[str | None, str | None], usage: dict
) -> dict:
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": reason[0],
        "stop_sequence": reason[1],
        "usage": usage,
    }


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens}


def error_body(error: ApiError) -> dict:
    kind = ERROR_TYPES.get(error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def event(name: str, data: dict) -> bytes:
    """One server-sent event as Anthropic sends them: `event: <type>` and its data."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# -- routes ---------------------------------------------------------------------------------------

Route = Callable[[Request], Awaitable[object]]


def router(fleet: Fleet) -> APIRouter:
    """/v1/messages and /v1/messages/count_tokens; with --api-key they want the key in
    `x-api-key` (Anthropic's header) or as 'Authorization: Bearer <key>'."""
    router = APIRouter(prefix="/v1/messages")

    def route(handler: Route) -> Route:
        @functools.wraps(handler)
        async def answer(request: Request) -> object:
            try:
                _authorize(fleet, request)
                return await handler(request)
            except ApiError as error:
                return JSONResponse(
                    error_body(error), status_code=error.status, headers=error.headers
                )

        return answer

    router.post("", response_model=None)(route(functools.partial(_messages, fleet)))

    @router.post("/count_tokens", response_model=None)
    @route
    async def count_tokens(request: Request) -> dict:
        body = parse(CountTokensRequest, await read_body(request, fleet.max_body))
        service, _adapter = await fleet.acquire(request, body.model)
        ids, _ = await run_in_threadpool(prompt, body, service)
        return {"input_tokens": len(ids)}

    return router


def _authorize(fleet: Fleet, request: Request) -> None:
    key, given = fleet.api_key, request.headers.get("x-api-key")
    if not authorized(request.headers.get("authorization"), key) and not (
        given is not None and authorized(f"Bearer {given}", key)
    ):
        raise ApiError("incorrect or missing API key: send it in 'x-api-key'", status=401)


async def _messages(fleet: Fleet, request: Request) -> object:
    body = parse(MessagesRequest, await read_body(request, fleet.max_body))
    service, adapter = await fleet.acquire(request, body.model)
    # The template is code from the model file: rendered (and tokenized) off the loop.
    ids, extra = await run_in_threadpool(prompt, body, service)
    budget = convert.token_budget(
        prompt_tokens=len(ids),
        max_tokens=body.max_tokens,
        context_length=service.context_length,
        hint="shorten the conversation",
    )
    jobs = Jobs(service, adapter=adapter)
    params = generation_params(
        body, budget=budget, extra_stops=extra, vocab_size=service.vocab_size
    )
    jobs.add(0, prompt_ids=ids, params=params)
    jobs.submit()
    id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        return StreamingResponse(
            _events(service, body, jobs, id=id, prompt_tokens=len(ids)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    (choice,) = await collect(jobs, request, 1)
    reason = stop_reason(choice.finish_reason, choice.stop_sequence, body.stop_sequences)
    return message(
        id=id,
        model=service.model_id(adapter),
        text="".join(choice.text),
        reason=reason,
        usage=usage(len(ids), choice.completion_tokens),
    )


async def _events(
    service: Served, body: MessagesRequest, jobs: Jobs, *, id: str, prompt_tokens: int
) -> AsyncIterator[bytes]:
    start = message(
        id=id,
        model=service.model_id(jobs.adapter),
        text=None,
        reason=(None, None),
        usage=usage(prompt_tokens, 0),
    )
    yield event("message_start", {"type": "message_start", "message": start})
    block = {"type": "text", "text": ""}
    yield event(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
    )
    yield event("ping", {"type": "ping"})
    try:
        async for _, step in jobs.events():
            if failure := convert.engine_failure(step.finish_reason, timeout=service.timeout):
                raise failure
            if step.text:
                delta = {"type": "text_delta", "text": step.text}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            if step.finish_reason is not None:
                reason = stop_reason(step.finish_reason, step.stop_sequence, body.stop_sequences)
                last = {"stop_reason": reason[0], "stop_sequence": reason[1]}
                output = {"output_tokens": step.completion_tokens}
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield event("message_delta", {"type": "message_delta", "delta": last, "usage": output})
        yield event("message_stop", {"type": "message_stop"})
    except ApiError as error:  # after the headers went out: an error event, then stop
        yield event("error", error_body(error))
    finally:
        jobs.cancel()
