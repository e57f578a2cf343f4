"""Anthropic's Messages API on the same engine: POST /v1/messages (streamed and not) and
/v1/messages/count_tokens, for programs written against the `anthropic` client.

A request becomes the same engine request as a chat completion (`jobs.Jobs` on the
server's scheduler, `convert.sampling_params`, `convert.chat_prompt`,
`convert.token_budget`); the answer is a `message` of content blocks, or the stream of
events message_start, ping, then for each block content_block_start,
content_block_delta..., content_block_stop, and message_delta, message_stop. `stop_reason`
is end_turn (the model ended its turn), max_tokens, stop_sequence (with the
`stop_sequence` that matched) or tool_use. Failures come in Anthropic's shape,
{"type": "error", "error": {"type", "message"}}; a failure after a stream has begun is an
`error` event. A last assistant message is continued (Anthropic's "prefill").
`output_config.format` (a JSON schema) is enforced by the engine's constrained decoding.

Tools are the OpenAI route's machinery (`serve.tools.offered`: the model's chat template or
the default section renders them, a grammar holds the calls to `input_schema`,
`prompting.toolcalls.ToolCallParser` finds them in the output): `tools` [{name,
description, input_schema}] become function definitions, `tool_choice` auto / any / tool /
none and `disable_parallel_tool_use` its choices, `tool_use` blocks of assistant turns its
`tool_calls` and `tool_result` blocks of user turns its `role: "tool"` messages; the calls
the model writes come back as `tool_use` blocks (ids `toolu_...`), streamed as
`input_json_delta` fragments. Streamed or not, one `Blocks` turns the output into the same
block events, so the `anthropic` client's accumulated stream equals the whole reply.
Knows nothing of how tokens are computed. (docs.anthropic.com: Messages, Streaming
Messages, Tool use, Errors.)
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar
from pocketlm.generate.params import GenerationParams
from pocketlm.prompting.toolcalls import ToolCallParser
from pocketlm.serve import convert, tools
from pocketlm.serve.fleet import Fleet
from pocketlm.serve.guard import authorized
from pocketlm.serve.jobs import Jobs, Served, collect, read_body
from pocketlm.serve.schemas import (
    ApiError,
    ChatMessage,
    FunctionCall,
    SamplingKnobs,
    ToolCall,
    _Wire,
    parse,
)
from pocketlm.serve.tools import Tooling
from pocketlm.tokenizer import Tokenizer

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
    # text blocks; tool_use (assistant) and tool_result (user) blocks; others are refused
    content: str | list[dict]


class ToolDefinition(_Wire):
    """A client tool, {name, description, input_schema}; Anthropic's server tools (web
    search, code execution...) have a `type` of their own and are refused by name."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict | None = None
    type: str | None = None


class ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class CountTokensRequest(_Wire):
    """POST /v1/messages/count_tokens; the prompt part of a Messages request."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None  # "none" leaves the tools out of the prompt


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None  # pocketlm's, as on the OpenAI routes: Anthropic's API has none
    metadata: dict | None = None
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


def chat_messages(body: CountTokensRequest) -> list[ChatMessage]:
    """The system prompt and messages as the OpenAI route's messages: an assistant's
    tool_use blocks its `tool_calls`, a user's tool_result blocks `role: "tool"` messages
    (before the turn's text, where Anthropic puts them)."""
    out = []
    if body.system:
        out.append(ChatMessage(role="system", content=text_of(body.system, where="system")))
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append(ChatMessage(role=m.role, content=m.content))
            continue
        texts, calls, results = [], [], 0
        for j, block in enumerate(m.content):
            where, kind = f"messages.{i}.content.{j}", block.get("type")
            if kind == "text":
                texts.append(text_of([block], where=where))
            elif kind == "tool_use" and m.role == "assistant":
                calls.append(_tool_call(block, where=where))
            elif kind == "tool_result" and m.role == "user":
                out.append(_tool_result(block, where=where))
                results += 1
            else:
                raise ApiError(
                    f"{where}: {kind!r} blocks are not supported in {m.role} turns (text, "
                    "tool_use in assistant turns and tool_result in user turns are)"
                )
        if texts or calls or not results:  # (a turn of results alone is those)
            text = "".join(texts)
            content = None if calls and not text else text
            out.append(ChatMessage(role=m.role, content=content, tool_calls=calls or None))
    return out


def _tool_call(block: dict, *, where: str) -> ToolCall:
    id, name, input = block.get("id"), block.get("name"), block.get("input")
    if not (isinstance(id, str) and isinstance(name, str) and isinstance(input, dict)):
        raise ApiError(f"{where}: a tool_use block needs an id, a name and an input object")
    arguments = json.dumps(input, ensure_ascii=False)
    return ToolCall(id=id, function=FunctionCall(name=name, arguments=arguments))


def _tool_result(block: dict, *, where: str) -> ChatMessage:
    """A tool_result block as a tool message; an error's text says it was one (templates
    know no is_error)."""
    id = block.get("tool_use_id")
    if not isinstance(id, str):
        raise ApiError(f"{where}: a tool_result block needs the tool_use_id it answers")
    content = block.get("content", "")
    if not isinstance(content, str | list):
        raise ApiError(f"{where}.content: a string or text blocks")
    text = text_of(content, where=where)
    if block.get("is_error"):
        text = f"Error: {text}"
    return ChatMessage(role="tool", content=text, tool_call_id=id)


def tooling(body: CountTokensRequest, tokenizer: Tokenizer) -> Tooling | None:
    """The request's tools and tool_choice as the OpenAI route's (`tools.offered`); None
    without tools or with tool_choice none."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice.type != "none":
            raise ApiError("tool_choice needs tools to choose from")
        return None
    definitions = [_definition(t, where=f"tools.{i}") for i, t in enumerate(body.tools)]
    choice = choice or ToolChoice(type="auto")
    if choice.type == "none":
        return None
    if choice.type == "tool" and not choice.name:
        raise ApiError('tool_choice {"type": "tool"} needs the name of the tool')
    name = {"auto": "auto", "any": "required"}.get(choice.type, choice.name)
    parallel = not choice.disable_parallel_tool_use
    return tools.offered(definitions, choice=name, parallel=parallel, tokenizer=tokenizer)


def _definition(tool: ToolDefinition, *, where: str) -> dict:
    """An Anthropic tool as OpenAI's function definition (what templates render)."""
    if tool.type not in (None, "custom"):
        raise ApiError(
            f"{where}: server tools (type {tool.type!r}) are not supported; define client "
            "tools with name, description and input_schema"
        )
    schema = tool.input_schema
    if schema is None or schema.get("type") != "object":
        raise ApiError(f'{where}.input_schema must be a JSON schema of "type": "object"')
    function = {"name": tool.name, "description": tool.description, "parameters": schema}
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


@dataclass
class Prompt:
    ids: list[int]
    extra_stops: tuple[str, ...]  # the transcript harness's, for a model without a template
    tooling: Tooling | None


def prompt(body: CountTokensRequest, service: Served) -> Prompt:
    """The model's chat template (or the transcript harness) over the system prompt,
    messages and tools; a last assistant message is continued."""
    messages = chat_messages(body)
    # too many bytes to fit: refused before rendering and tokenizing
    calls = [c.function.arguments for m in messages for c in m.tool_calls or ()]
    service.check_prompt_bytes(
        ["".join([*(m.text or "" for m in messages), *calls])], param="messages"
    )
    prefill = None
    if messages[-1].role == "assistant":
        if messages[-1].tool_calls:
            raise ApiError(
                f"messages.{len(body.messages) - 1}: a last assistant turn with tool_use "
                "blocks cannot be continued; send its tool_result in a user turn"
            )
        prefill = messages.pop().text
    if not any(m.role in ("user", "tool") for m in messages):
        raise ApiError("messages: the conversation needs a user message")
    offered = tooling(body, service.tokenizer)
    ids, extra = convert.chat_prompt(messages, service.tokenizer, tools=offered and offered.tools)
    if prefill:
        # Anthropic strips the prefill's trailing whitespace and so do we: a trailing
        # space would make the model start a word with a second one.
        ids = ids + service.tokenizer.encode(prefill.rstrip(), add_bos=False)
    return Prompt(ids, extra, offered)


def generation_params(
    body: MessagesRequest, *, budget: int, prompt: Prompt, vocab_size: int
) -> GenerationParams:
    if body.thinking and body.thinking.get("type") == "enabled":
        raise ApiError("thinking is not supported by this model")
    stops = tuple(body.stop_sequences or ())
    if any(not s for s in stops):
        raise ApiError("stop_sequences must not be empty strings")
    sampling = convert.sampling_params(
        SamplingKnobs(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed
        ),
        vocab_size=vocab_size,
    )
    grammar = output_grammar((body.output_config or {}).get("format"))
    if grammar and prompt.tooling:
        raise ApiError(
            "output_config.format and tools cannot be combined: a reply is either JSON "
            "text or tool calls"
        )
    grammar = prompt.tooling.grammar if prompt.tooling else grammar
    return GenerationParams(
        sampling, max_tokens=budget, stop=(*stops, *prompt.extra_stops), grammar=grammar
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
    finish_reason: str | None, matched: str | None, stops: list[str] | None, *, called: bool = False
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): a stop string the request gave is stop_sequence; the
    model's end of turn (end-of-text, or the transcript's next "User:") is end_turn, or
    tool_use when the reply `called` a tool."""
    if finish_reason == "stop" and matched is not None and matched in (stops or ()):
        return "stop_sequence", matched
    reason = STOP_REASONS.get(finish_reason or "stop", "end_turn")
    return ("tool_use" if called and reason == "end_turn" else reason), None


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


class Blocks:
    """The reply's text, piece by piece, as content block events (content_block_start,
    content_block_delta, content_block_stop, as dicts): text blocks, and with tools a
    tool_use block for each call the parser finds, its input as `input_json_delta`
    fragments. A reply with no block at all gets one empty text block."""

    def __init__(self, tooling: Tooling | None) -> None:
        self.parser = ToolCallParser(tooling.fmt, new_id=tool_use_id) if tooling else None
        self.index, self.open, self.called = -1, None, False

    def feed(self, text: str, *, final: bool) -> list[dict]:
        """The events of the reply's next piece `text` (`final`: the reply ends there)."""
        pieces = [text] if self.parser is None else self.parser.feed(text)
        if final and self.parser is not None:
            pieces += self.parser.finish()
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                if piece and self.open != "text":
                    out += self._start({"type": "text", "text": ""})
                if piece:
                    out.append(self._delta({"type": "text_delta", "text": piece}))
                continue
            if piece.id is not None:  # a call begins: its id and name, then its input
                block = {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
                out += self._start(block)
                self.called = True
            if piece.arguments:
                out.append(
                    self._delta({"type": "input_json_delta", "partial_json": piece.arguments})
                )
        if final:
            if self.open is None:
                out += self._start({"type": "text", "text": ""})
            out.append({"type": "content_block_stop", "index": self.index})
        return out

    def _start(self, block: dict) -> list[dict]:
        out = [] if self.open is None else [{"type": "content_block_stop", "index": self.index}]
        self.index, self.open = self.index + 1, block["type"]
        return [*out, {"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}


def content(events: list[dict]) -> list[dict]:
    """The content blocks a list of block events makes, as the `anthropic` client
    accumulates a stream: text deltas joined, a tool_use block's JSON fragments parsed at
    its end ({} for a call cut short by max_tokens)."""
    blocks, inputs = [], {}
    for e in events:
        if e["type"] == "content_block_start":
            blocks.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta":
            blocks[e["index"]]["text"] += e["delta"]["text"]
        elif e["type"] == "content_block_delta":
            inputs[e["index"]] = inputs.get(e["index"], "") + e["delta"]["partial_json"]
        elif e["type"] == "content_block_stop" and e["index"] in inputs:
            blocks[e["index"]]["input"] = _input(inputs[e["index"]])
    return blocks


def _input(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def message(
    *,
    id: str,
    model: str,
    content: list[dict],
    reason: tuple[str | None, str | None],
    usage: dict,
) -> dict:
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
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
        asked = await run_in_threadpool(prompt, body, service)
        return {"input_tokens": len(asked.ids)}

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
    asked = await run_in_threadpool(prompt, body, service)
    budget = convert.token_budget(
        prompt_tokens=len(asked.ids),
        max_tokens=body.max_tokens,
        context_length=service.context_length,
        hint="shorten the conversation",
    )
    jobs = Jobs(service, adapter=adapter)
    params = generation_params(body, budget=budget, prompt=asked, vocab_size=service.vocab_size)
    jobs.add(0, prompt_ids=asked.ids, params=params)
    jobs.submit()
    id = f"msg_{uuid.uuid4().hex}"
    blocks = Blocks(asked.tooling)
    if body.stream:
        return StreamingResponse(
            _events(service, body, jobs, blocks, id=id, prompt_tokens=len(asked.ids)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    (choice,) = await collect(jobs, request, 1)
    events = blocks.feed("".join(choice.text), final=True)
    reason = stop_reason(
        choice.finish_reason, choice.stop_sequence, body.stop_sequences, called=blocks.called
    )
    return message(
        id=id,
        model=service.model_id(adapter),
        content=content(events),
        reason=reason,
        usage=usage(len(asked.ids), choice.completion_tokens),
    )


async def _events(
    service: Served,
    body: MessagesRequest,
    jobs: Jobs,
    blocks: Blocks,
    *,
    id: str,
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    start = message(
        id=id,
        model=service.model_id(jobs.adapter),
        content=[],
        reason=(None, None),
        usage=usage(prompt_tokens, 0),
    )
    yield event("message_start", {"type": "message_start", "message": start})
    yield event("ping", {"type": "ping"})
    try:
        async for _, step in jobs.events():
            if failure := convert.engine_failure(step.finish_reason, timeout=service.timeout):
                raise failure
            final = step.finish_reason is not None
            for data in blocks.feed(step.text, final=final):
                yield event(data["type"], data)
            if final:
                reason = stop_reason(
                    step.finish_reason,
                    step.stop_sequence,
                    body.stop_sequences,
                    called=blocks.called,
                )
                last = {"stop_reason": reason[0], "stop_sequence": reason[1]}
                output = {"output_tokens": step.completion_tokens}
        yield event("message_delta", {"type": "message_delta", "delta": last, "usage": output})
        yield event("message_stop", {"type": "message_stop"})
    except ApiError as error:  # after the headers went out: an error event, then stop
        yield event("error", error_body(error))
    finally:
        jobs.cancel()
