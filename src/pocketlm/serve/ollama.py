"""Ollama's API on the same engine: /api/generate, /api/chat, /api/embed, /api/tags,
/api/show, /api/ps and /api/version, so programs written for Ollama work unchanged.

A request becomes the same engine requests as on the OpenAI routes (`jobs.Jobs` on the
server's scheduler, `convert.sampling_params`, `convert.chat_prompt`,
`convert.token_budget`); answers and the NDJSON stream lines are shaped as Ollama's
docs/api.md describes them and the official `ollama` Python client reads them. Failures
are Ollama's `{"error": "..."}` with the HTTP status; a failure after a stream has begun is
an `{"error": ...}` line. Where pocketlm differs on purpose: a prompt longer than the
context (`num_ctx`, at most the model's) is refused with the numbers unless the request
sends `"truncate": true` -- Ollama cuts it quietly; `format` ("json" or a JSON schema)
is enforced by the engine's constrained decoding. `keep_alive` sets how long the model
stays loaded once idle, as Ollama's does (serve/fleet.py). Knows nothing of how tokens are
computed. Wire schemas in `ollama_schemas.py`. (ollama `server/routes.go`.)
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar
from pocketlm.generate.params import GenerationParams
from pocketlm.sampling import SamplingParams
from pocketlm.serve import convert
from pocketlm.serve.fleet import Fleet
from pocketlm.serve.guard import authorized
from pocketlm.serve.jobs import Jobs, Served, read_body
from pocketlm.serve.ollama_schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    Options,
    ShowRequest,
    _Generating,
)
from pocketlm.serve.schemas import ApiError, ChatMessage, SamplingKnobs, parse
from pocketlm.weights.card import ModelCard, describe, human_count

TRUNCATE_HINT = 'shorten it, or send "truncate": true to keep only its last tokens'

# -- requests -> engine -------------------------------------------------------------------------


def refuse_unsupported(body: _Generating) -> None:
    """A clear 400 for what pocketlm cannot do yet, rather than quietly ignoring it."""
    if body.think not in (None, False):
        raise ApiError("this model does not support thinking")
    if body.logprobs:
        raise ApiError("logprobs are not supported on the Ollama API; use /v1/chat/completions")
    options = body.options
    if options.mirostat:
        raise ApiError("mirostat sampling is not supported; use temperature, top_k and top_p")
    if options.typical_p not in (None, 1.0):
        raise ApiError("typical_p sampling is not supported; use temperature, top_k and top_p")
    if options.num_predict == 0:
        raise ApiError("num_predict must be positive, or -1 for as many as fit")
    if any(not s for s in options.stop or ()):
        raise ApiError("stop sequences must not be empty strings")


def sampling_params(options: Options, *, vocab_size: int) -> SamplingParams:
    """SamplingParams from Ollama's options, with Ollama's defaults (temperature 0.8,
    top_k 40, top_p 0.9); a negative seed is Ollama's "random"."""
    knobs = dict(
        temperature=_default(options.temperature, 0.8),
        top_k=_default(options.top_k, 40),
        top_p=_default(options.top_p, 0.9),
        min_p=options.min_p,
        repetition_penalty=options.repeat_penalty,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        logit_bias=None,
        seed=options.seed if options.seed is not None and options.seed >= 0 else None,
    )
    return convert.sampling_params(SamplingKnobs(**knobs), vocab_size=vocab_size)


def _default(value, fallback):  # noqa: ANN001, ANN202 - a typed `or` that keeps 0
    return fallback if value is None else value


def fit(
    ids: list[int], options: Options, *, truncate: bool, context_length: int
) -> tuple[list[int], int]:
    """(prompt ids, new-token budget) within the window: `num_ctx` when it is smaller than
    the model's context. A prompt that does not fit is refused unless `truncate`."""
    window = min(options.num_ctx or context_length, context_length)
    wanted = options.num_predict if options.num_predict and options.num_predict > 0 else None
    if truncate:
        ids = convert.truncate_prompt(ids, -1, max_tokens=wanted, context_length=window)
    budget = convert.token_budget(
        prompt_tokens=len(ids),
        max_tokens=wanted,
        context_length=window,
        param="num_predict",
        hint=TRUNCATE_HINT,
        window="this model's context" if window == context_length else "num_ctx",
    )
    return ids, budget


def generate_prompt(body: GenerateRequest, service: Served) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, extra stops) for /api/generate: the model's chat template around the
    prompt (and system), as Ollama applies it, unless `raw` or the model has none; after
    the `context` a previous answer returned."""
    tokenizer = service.tokenizer
    if body.suffix:
        raise ApiError("suffix (fill-in-the-middle) is not supported")
    if body.template:
        raise ApiError("template is not supported: the model's own chat template is used")
    if body.images:
        raise ApiError(f"'{service.name}' does not support images")
    extra: tuple[str, ...] = ()
    if body.raw or tokenizer.chat_template is None:
        text = f"{body.system}\n\n{body.prompt}" if body.system and not body.raw else body.prompt
        ids = tokenizer.encode(text, add_bos=None if not body.context else False)
    else:
        messages = [ChatMessage(role="user", content=body.prompt)]
        if body.system:
            messages.insert(0, ChatMessage(role="system", content=body.system))
        ids, extra = convert.chat_prompt(messages, tokenizer)
    if body.context:
        convert.prompt_ids(body.context, tokenizer, vocab_size=service.vocab_size)  # checks ids
        ids = list(body.context) + ids
    return ids, extra


def chat_messages(body: ChatRequest, service: Served) -> list[ChatMessage]:
    if body.tools:
        raise ApiError("tools (function calling) are not supported yet")
    for m in body.messages:
        if m.images:
            raise ApiError(f"'{service.name}' does not support images")
        if m.tool_calls:
            raise ApiError("tool calls are not supported yet")
    return [ChatMessage(role=m.role, content=m.content or "") for m in body.messages]


def format_grammar(format: str | dict | None) -> Grammar | None:
    """The grammar Ollama's `format` asks for: "json" (any JSON object) or JSON valid under
    a JSON schema; a schema the constraint cannot enforce is a 400 naming what it uses."""
    if format in (None, ""):
        return None
    if format == "json":
        return Grammar.json_object()
    if not isinstance(format, dict):
        raise ApiError(f'format must be "json" or a JSON schema (got {format!r})')
    try:
        return Grammar.json_schema(format)
    except PocketLMError as error:
        raise ApiError(f"format: {error}") from None


def params(
    options: Options,
    *,
    extra_stops: tuple[str, ...],
    budget: int,
    vocab_size: int,
    grammar: Grammar | None = None,
) -> GenerationParams:
    return GenerationParams(
        sampling_params(options, vocab_size=vocab_size),
        max_tokens=budget,
        stop=(*(options.stop or ()), *extra_stops),
        grammar=grammar,
    )


# -- engine -> answers --------------------------------------------------------------------------


def now() -> str:
    """RFC 3339 time in UTC, as Ollama stamps `created_at`."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Clock:
    """Ollama's durations (nanoseconds): from the request to its first token (the prompt's
    evaluation, queueing included) and from there to the end."""

    def __init__(self) -> None:
        self.start = self.first = time.perf_counter_ns()

    def tick(self, count: int) -> None:
        if count == 0:
            self.first = time.perf_counter_ns()

    def totals(self, *, prompt_tokens: int, tokens: int) -> dict:
        end = time.perf_counter_ns()
        return {
            "total_duration": end - self.start,
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": self.first - self.start,
            "eval_count": tokens,
            "eval_duration": end - self.first,
        }


def done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


def ndjson(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def normalized(vector: list[float]) -> list[float]:
    """Unit length, as Ollama's /api/embed returns its vectors."""
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def details(card: ModelCard) -> dict:
    return {
        "parent_model": "",
        "format": "gguf" if card.path.suffix == ".gguf" else "safetensors",
        "family": card.architecture,
        "families": [card.architecture],
        "parameter_size": human_count(card.parameters),
        "quantization_level": card.quantization.upper(),
    }


def model_info(card: ModelCard, *, context_length: int) -> dict:
    """GGUF-style keys, as Ollama reports them; clients read `<arch>.context_length`."""
    arch = card.architecture
    return {
        "general.architecture": arch,
        "general.parameter_count": card.parameters,
        f"{arch}.context_length": context_length,
        f"{arch}.embedding_length": card.width,
        f"{arch}.block_count": card.layers,
        f"{arch}.attention.head_count": card.heads,
        f"{arch}.attention.head_count_kv": card.kv_heads,
        f"{arch}.vocab_size": card.vocab,
    }


# -- routes ---------------------------------------------------------------------------------------

Route = Callable[[Request], Awaitable[object]]


def router(fleet: Fleet) -> APIRouter:
    """The /api routes; with --api-key they want 'Authorization: Bearer <key>' too."""
    router = APIRouter(prefix="/api")
    route = functools.partial(_answering_errors, fleet)
    posts = {"/generate": _generate, "/chat": _chat, "/embed": _embed, "/embeddings": _embeddings}
    for path, handler in posts.items():
        router.post(path, response_model=None)(route(functools.partial(handler, fleet)))

    @router.get("/version")
    async def version() -> dict:
        return {"version": metadata.version("pocketlm")}

    _model_routes(router, fleet, route)
    return router


def _answering_errors(fleet: Fleet, handler: Route) -> Route:
    """`handler` behind the API key, its ApiErrors answered in Ollama's shape."""

    @functools.wraps(handler)
    async def answer(request: Request) -> object:
        try:
            if not authorized(request.headers.get("authorization"), fleet.api_key):
                raise ApiError("incorrect or missing API key", status=401)
            return await handler(request)
        except ApiError as error:
            return JSONResponse(
                {"error": error.message}, status_code=error.status, headers=error.headers
            )

    return answer


def _model_routes(router: APIRouter, fleet: Fleet, route: Callable[[Route], Route]) -> None:
    """/api/tags (every model it can serve), /api/ps (those loaded now) and /api/show,
    from each model's card (read once)."""

    @functools.cache
    def card(name: str) -> ModelCard:
        return describe(fleet.specs[name].path, name=name)

    @router.get("/tags", response_model=None)
    @route
    async def tags(request: Request) -> dict:
        models = []
        for name in fleet.specs:
            entry = {"name": name, "model": name, "modified_at": _mtime(card(name))}
            models.append({**entry, "size": card(name).file_size, "details": details(card(name))})
        return {"models": models}

    @router.get("/ps", response_model=None)
    @route
    async def ps(request: Request) -> dict:
        models = []
        for name, loaded in fleet.loaded.items():
            service, size = loaded.service, loaded.size
            on_gpu = service.scheduler.device.type != "cpu"
            entry = {"name": name, "model": name, "size": size, "size_vram": size if on_gpu else 0}
            entry |= {"details": details(card(name)), "context_length": service.context_length}
            # When it unloads if nothing uses it meanwhile (None: never, or in use now).
            at = fleet.expires_at(loaded)
            expires = at and datetime.fromtimestamp(at, timezone.utc)
            entry["expires_at"] = expires and expires.isoformat().replace("+00:00", "Z")
            models.append({**entry, "requests": loaded.users})
        return {"models": models}

    @router.post("/show", response_model=None)
    @route
    async def show(request: Request) -> dict:
        body = parse(ShowRequest, await read_body(request, fleet.max_body))
        service, _adapter = await fleet.acquire(request, body.model or body.name)
        info = card(service.name)
        return {
            "modelfile": f"# pocketlm serves this model as loaded\nFROM {info.path}\n",
            "parameters": "",
            "template": service.tokenizer.chat_template or "",
            "details": details(info),
            "model_info": model_info(info, context_length=service.context_length),
            "capabilities": ["completion"],
            "modified_at": _mtime(info),
        }


def _mtime(card: ModelCard) -> str:
    stamp = card.path.stat().st_mtime
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat().replace("+00:00", "Z")


def _loaded(service: Served, **fields: object) -> dict:
    """The answer to a request with nothing to generate: Ollama's way to load a model."""
    return {
        "model": service.name,
        "created_at": now(),
        **fields,
        "done": True,
        "done_reason": "load",
    }


async def _generate(fleet: Fleet, request: Request) -> object:
    body = parse(GenerateRequest, await read_body(request, fleet.max_body))
    service, adapter = await fleet.acquire(request, body.model, keep_alive=body.keep_alive)
    refuse_unsupported(body)
    if not body.prompt and not body.context:
        return _loaded(service, response="")
    if not body.truncate:  # too many bytes to fit: refused before tokenizing
        service.check_prompt_bytes([body.prompt])
    # The template is code from the model file: rendered (and tokenized) off the loop.
    ids, extra = await run_in_threadpool(generate_prompt, body, service)
    return await _run(service, request, body, ids, extra, chat=False, adapter=adapter)


async def _chat(fleet: Fleet, request: Request) -> object:
    body = parse(ChatRequest, await read_body(request, fleet.max_body))
    service, adapter = await fleet.acquire(request, body.model, keep_alive=body.keep_alive)
    refuse_unsupported(body)
    messages = chat_messages(body, service)
    if not messages:
        return _loaded(service, message={"role": "assistant", "content": ""})
    if not body.truncate:  # too many bytes to fit: refused before tokenizing
        service.check_prompt_bytes(["".join(m.content for m in messages)], param="messages")
    ids, extra = await run_in_threadpool(convert.chat_prompt, messages, service.tokenizer)
    return await _run(service, request, body, ids, extra, chat=True, adapter=adapter)


async def _run(
    service: Served,
    request: Request,
    body: _Generating,
    ids: list[int],
    extra: tuple[str, ...],
    *,
    chat: bool,
    adapter: str | None,
) -> object:
    """Generate for /api/generate or /api/chat (with the LoRA adapter the model named):
    one JSON answer or an NDJSON stream."""
    ids, budget = fit(
        ids, body.options, truncate=body.truncate, context_length=service.context_length
    )
    jobs = Jobs(service, adapter=adapter)
    jobs.add(
        0,
        prompt_ids=ids,
        params=params(
            body.options,
            extra_stops=extra,
            budget=budget,
            vocab_size=service.vocab_size,
            grammar=format_grammar(body.format),
        ),
    )
    answer = _Answer(service.model_id(adapter), ids, chat=chat)
    jobs.submit()
    if body.stream is False:
        choice = await _gather(jobs, request, answer.clock)
        return answer.line("".join(choice.text), last=choice)
    return StreamingResponse(_lines(jobs, answer), media_type="application/x-ndjson")


class _Answer:
    """The lines of one answer: /api/generate's text in "response" and the conversation's
    token ids in "context" on the last line, /api/chat's in "message"."""

    def __init__(self, model: str, ids: list[int], *, chat: bool) -> None:
        self.model, self.ids, self.chat = model, ids, chat
        self.clock = Clock()

    def line(self, text: str, *, last: convert.Choice | None = None) -> dict:
        line = {"model": self.model, "created_at": now()}
        if self.chat:
            line["message"] = {"role": "assistant", "content": text}
        else:
            line["response"] = text
        line["done"] = last is not None
        if last is not None:
            line["done_reason"] = done_reason(last.finish_reason)
            if not self.chat:
                line["context"] = self.ids + last.tokens
            line |= self.clock.totals(prompt_tokens=len(self.ids), tokens=last.completion_tokens)
        return line


async def _lines(jobs: Jobs, answer: _Answer) -> AsyncIterator[bytes]:
    choice = convert.Choice(0)
    try:
        async for _, event in jobs.events():
            answer.clock.tick(len(choice.tokens))
            choice.add(event)
            if failure := convert.engine_failure(event.finish_reason, timeout=jobs.service.timeout):
                raise failure
            if event.text:
                yield ndjson(answer.line(event.text))
        yield ndjson(answer.line("", last=choice))
    except ApiError as error:  # after the headers went out: an error line, then stop
        yield ndjson({"error": error.message})
    finally:
        jobs.cancel()


async def _gather(jobs: Jobs, request: Request, clock: Clock) -> convert.Choice:
    """The one choice, timed; cancelled if the client goes away meanwhile."""
    choice = convert.Choice(0)
    try:
        async for _, event in jobs.events():
            clock.tick(len(choice.tokens))
            choice.add(event)
            if await request.is_disconnected():
                break
    finally:
        jobs.cancel()
    if failure := convert.engine_failure(choice.finish_reason, timeout=jobs.service.timeout):
        raise failure
    return choice


async def _embed(fleet: Fleet, request: Request) -> dict:
    body = parse(EmbedRequest, await read_body(request, fleet.max_body))
    service, _adapter = await fleet.acquire(request, body.model, keep_alive=body.keep_alive)
    if body.dimensions is not None:
        raise ApiError("dimensions is not supported: the vectors have the model's width")
    started = time.perf_counter_ns()
    texts = [body.input] if isinstance(body.input, str) else body.input
    batches = await run_in_threadpool(
        functools.partial(embedding_ids, options=body.options, truncate=body.truncate),
        texts,
        service,
    )
    vectors = await _vectors(service, request, batches) if batches else []
    return {
        "model": service.name,
        "embeddings": [normalized(v) for v in vectors],
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": 0,
        "prompt_eval_count": sum(len(ids) for ids in batches),
    }


async def _embeddings(fleet: Fleet, request: Request) -> dict:
    """The older /api/embeddings: one prompt, its vector as the model gives it."""
    body = parse(EmbeddingsRequest, await read_body(request, fleet.max_body))
    service, _adapter = await fleet.acquire(request, body.model, keep_alive=body.keep_alive)
    if not body.prompt:
        return {"embedding": []}
    batches = await run_in_threadpool(
        functools.partial(embedding_ids, options=body.options, truncate=False),
        [body.prompt],
        service,
    )
    (vector,) = await _vectors(service, request, batches)
    return {"embedding": vector}


async def _vectors(
    service: Served, request: Request, batches: list[list[int]]
) -> list[list[float]]:
    """The vectors, through the server's embeddings queue (its caps, time limit and
    cancellation when the client goes away)."""
    return await service.embedder.run(
        batches, timeout=service.timeout, disconnected=request.is_disconnected
    )


def embedding_ids(
    texts: list[str], service: Served, *, options: Options, truncate: bool
) -> list[list[int]]:
    """Each text's ids within the window (`num_ctx`, at most the model's context): an input
    that does not fit is refused with the numbers unless `truncate` keeps its last tokens."""
    if any(not text for text in texts):
        raise ApiError("an input to embed is empty")
    if not truncate:  # too many bytes to fit: refused before tokenizing
        service.check_prompt_bytes(texts, param="input")
    batches = service.tokenizer.encode_batch(texts)
    window = min(options.num_ctx or service.context_length, service.context_length)
    name = "this model's context" if window == service.context_length else "num_ctx"
    for i, ids in enumerate(batches):
        if truncate:
            batches[i] = ids = ids[-window:]
        if len(ids) > window:
            raise ApiError(
                f"input {i} has {len(ids):,} tokens; {name} is {window:,} ({TRUNCATE_HINT})"
            )
    return batches
