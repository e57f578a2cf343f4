"""The HTTP routes of `pocketlm serve`: an OpenAI-compatible API and a chat page.

Routes are thin: read and validate the body (schemas), take the model its `model` names
(a `Fleet`, serve/fleet.py: one model, or several loaded on demand), turn the body into
engine requests (convert), hand them to that model's scheduler, and turn its events back
into a response or a stream of server-sent events (convert). Every failure, including
unknown routes, bad JSON and a full queue, answers in OpenAI's error format so the
`openai` client raises the matching exception. A client that goes away mid-stream cancels
its requests, which frees their batch rows at the scheduler's next step.
FastAPI/Starlette; served by uvicorn. Knows nothing of how tokens are computed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from pocketlm.features.hidden import embed
from pocketlm.generate.constraint import Grammar
from pocketlm.generate.params import GenerationParams
from pocketlm.sampling import SamplingParams
from pocketlm.serve import DEFAULT_MAX_TOKENS, anthropic, convert, ollama, openapi, tokens, tools
from pocketlm.serve.adapters import chosen, load_adapters
from pocketlm.serve.convert import Choice
from pocketlm.serve.embedder import Embedder
from pocketlm.serve.fleet import Fleet, Leases, model_id, served_name
from pocketlm.serve.guard import Guard, Limits
from pocketlm.serve.jobs import Jobs, read_body, require_key
from pocketlm.serve.jobs import collect as _collect
from pocketlm.serve.prefix_cache import DEFAULT_BUDGET
from pocketlm.serve.scheduler import Event, Scheduler
from pocketlm.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_body,
    parse,
)

log = logging.getLogger("pocketlm.serve")


class Service:
    """A loaded model (`pocketlm.LM`) behind the routes, with the server's limits."""

    def __init__(
        self,
        lm,
        *,
        name: str | None = None,
        max_batch: int = 8,
        max_queue: int = 64,  # noqa: ANN001 - pocketlm.LM
        timeout: float | None = 600.0,
        api_key: str | None = None,
        limits: Limits = Limits(),  # noqa: B008 - frozen, shared safely
        cache_ram: int = DEFAULT_BUDGET,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        loras: Mapping[str, str | Path] | None = None,
    ) -> None:
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.name = name or served_name(lm.name)
        self.vocab_size = lm.model.config.vocab_size
        self.context_length = lm.context_length
        self.timeout, self.api_key, self.limits = timeout, api_key, limits
        self.max_body = limits.max_body
        # No token spells more bytes than the longest one, so a text longer than the
        # window times that cannot fit: refused before tokenizing (which takes seconds
        # for megabytes of text).
        longest = max(len(lm.tokenizer.token_bytes(i)) for i in range(lm.tokenizer.vocab_size))
        self.max_prompt_bytes = self.context_length * max(longest, 1)
        self.max_tokens = max_tokens  # for a request that does not say max_tokens
        if not lm.native and max_batch > 1:
            log.info(
                "%s runs through transformers, which decodes one sequence at a time: "
                "requests queue and are answered in turn (a batch of 1)",
                self.name,
            )
            max_batch = 1
        # LoRA adapters served unmerged beside the model (name -> folder; serve/adapters.py)
        self.adapters = load_adapters(lm, loras) if loras else None
        self.scheduler = Scheduler(
            lm.model,
            lm.tokenizer,
            max_batch=max_batch,
            max_queue=max_queue,
            max_seq_len=self.context_length,
            cache_ram=cache_ram,
            adapters=self.adapters,
        )
        # The model's function, not this service's method: no reference cycle, so an
        # unloaded model's memory goes back as soon as the last reference does.
        self.embedder = Embedder(functools.partial(_embed, lm.model), max_queue=max_queue)
        self.created = int(time.time())

    def model_id(self, adapter: str | None) -> str:
        """The model a response names: this one's, or "MODEL:NAME" for an adapter."""
        return model_id(self.name, adapter)

    def check_prompt_bytes(self, texts: list, param: str = "prompt") -> None:
        """Refuse a text (others: token ids) too long to fit the window, untokenized."""
        for text in texts:
            if isinstance(text, str) and (size := len(text.encode(errors="replace"))) > (
                self.max_prompt_bytes
            ):
                raise ApiError(
                    f"a prompt of {size:,} bytes cannot fit this model's {self.context_length} "
                    f"tokens (the limit is {self.max_prompt_bytes:,} bytes)",
                    param=param,
                    code="context_length_exceeded",
                )

    def embed(self, batches: list[list[int]]) -> list[list[float]]:
        return _embed(self.lm.model, batches)

    def close(self) -> None:
        """Stop its scheduler and embedding threads: the model is unloading."""
        self.scheduler.stop()
        self.embedder.close()


def _embed(model, batches: list[list[int]]) -> list[list[float]]:  # noqa: ANN001 - a model
    """Mean of the last layer's hidden states over each input's tokens."""
    vectors = embed(model, batches, layer=-1, pool="mean").vectors
    return [v.tolist() for v in vectors]


def _completion_jobs(
    service: Service, body: CompletionRequest, adapter: str | None
) -> tuple[Jobs, list[list[int]]]:
    if body.suffix:
        raise ApiError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError("best_of other than n is not supported", param="best_of")
    params = convert.sampling_params(body, vocab_size=service.vocab_size)
    stops = convert.stop_strings(body.stop)
    if body.truncate_prompt_tokens is None:  # else a long prompt is cut, not refused
        service.check_prompt_bytes([body.prompt] if isinstance(body.prompt, str) else body.prompt)
    prompts = [
        convert.truncate_prompt(
            ids,
            body.truncate_prompt_tokens,
            max_tokens=body.max_tokens,
            context_length=service.context_length,
        )
        for ids in convert.prompt_ids(body.prompt, service.tokenizer, vocab_size=service.vocab_size)
    ]
    jobs = Jobs(service, adapter=adapter)
    for p, ids in enumerate(prompts):
        budget = convert.token_budget(
            prompt_tokens=len(ids),
            max_tokens=body.max_tokens,
            context_length=service.context_length,
            default=service.max_tokens,
        )
        for i in range(body.n):
            jobs.add(
                p * body.n + i,
                prompt_ids=ids,
                params=_params(
                    params,
                    seed=convert.choice_seed(body.seed, i),
                    max_tokens=budget,
                    stop=stops,
                    logprobs=body.logprobs,
                ),
                prompt_logprobs=body.echo and body.logprobs is not None,
            )
    return jobs, prompts


def _chat_jobs(
    service: Service, body: ChatCompletionRequest, adapter: str | None
) -> tuple[Jobs, int, tools.Tooling | None]:
    grammar = convert.response_grammar(body.response_format)
    if body.top_logprobs and not body.logprobs:
        raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
    params = convert.sampling_params(body, vocab_size=service.vocab_size)
    if body.truncate_prompt_tokens is None:  # else a long prompt is cut, not refused
        service.check_prompt_bytes(["".join(m.text or "" for m in body.messages)], param="messages")
    tooling = tools.tooling(body, service.tokenizer)
    if tooling and grammar:
        raise ApiError(
            "response_format json_object/json_schema and tools cannot be combined: a reply "
            "is either JSON text or tool calls",
            param="response_format",
        )
    grammar = tooling.grammar if tooling else grammar
    ids, extra_stops = convert.chat_prompt(
        body.messages, service.tokenizer, tools=tooling and tooling.tools
    )
    stops = convert.stop_strings(body.stop) + extra_stops
    wanted = body.max_completion_tokens or body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    ids = convert.truncate_prompt(
        ids, body.truncate_prompt_tokens, max_tokens=wanted, context_length=service.context_length
    )
    budget = convert.token_budget(
        prompt_tokens=len(ids),
        max_tokens=wanted,
        context_length=service.context_length,
        param=name,
        default=service.max_tokens,
    )
    jobs = Jobs(service, adapter=adapter)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    for i in range(body.n):
        jobs.add(
            i,
            prompt_ids=ids,
            params=_params(
                params,
                seed=convert.choice_seed(body.seed, i),
                max_tokens=budget,
                stop=stops,
                logprobs=logprobs,
                grammar=grammar,
            ),
        )
    return jobs, len(ids), tooling


def _params(
    sampling: SamplingParams,
    *,
    seed: int | None,
    max_tokens: int,
    stop: list[str],
    logprobs: int | None,
    grammar: Grammar | None = None,
) -> GenerationParams:
    """One choice's engine params: each part was checked against the wire request."""
    sampling = dataclasses.replace(sampling, seed=seed)
    return GenerationParams(
        sampling, max_tokens=max_tokens, stop=tuple(stop), logprobs=logprobs, grammar=grammar
    )


def _stream(events: AsyncIterator[bytes], jobs: Jobs) -> StreamingResponse:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for piece in events:
                yield piece
        except ApiError as error:  # after the headers went out: an error event, then stop
            yield convert.sse(error.body())
        finally:
            jobs.cancel()  # the client left, or we are done: free the rows either way

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _check(event: Event, jobs: Jobs) -> None:
    if failure := convert.engine_failure(event.finish_reason, timeout=jobs.service.timeout):
        raise failure


async def _completion_events(
    service: Service, body: CompletionRequest, jobs: Jobs, prompts: list[list[int]]
) -> AsyncIterator[bytes]:
    model = service.model_id(jobs.adapter)
    meta = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)
    if body.echo:
        for index in range(len(jobs.requests)):
            text = service.tokenizer.decode(prompts[index // body.n])
            yield convert.sse(
                convert.completion_chunk(
                    **meta,
                    choices=[
                        convert.completion_choice(index, text, logprobs=None, finish_reason=None)
                    ],
                )
            )
    totals = [0, 0]
    async for index, event in jobs.events():
        _check(event, jobs)
        one = Choice(index)
        one.add(event)
        logprobs = (
            convert.completion_logprobs(one, service.tokenizer)
            if body.logprobs is not None
            else None
        )
        choice = convert.completion_choice(
            index, event.text, logprobs=logprobs, finish_reason=event.finish_reason
        )
        yield convert.sse(convert.completion_chunk(**meta, choices=[choice]))
        if event.finish_reason:
            totals[0] += event.prompt_tokens if index % body.n == 0 else 0
            totals[1] += event.completion_tokens
    if body.stream_options and body.stream_options.include_usage:
        yield convert.sse(
            convert.completion_chunk(**meta, choices=[], usage=convert.usage(*totals))
        )
    yield convert.sse("[DONE]")


async def _chat_events(
    service: Service,
    body: ChatCompletionRequest,
    jobs: Jobs,
    prompt_tokens: int,
    tooling: tools.Tooling | None,
) -> AsyncIterator[bytes]:
    include = bool(body.stream_options and body.stream_options.include_usage)
    meta = dict(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=service.model_id(jobs.adapter),
        include_usage=include,
    )
    for index in range(body.n):
        yield convert.sse(
            convert.chat_chunk(
                **meta, choices=[convert.chat_delta(index, role="assistant", content="")]
            )
        )
    completion_tokens = 0
    streams = [tools.DeltaStream(tooling) for _ in range(body.n)] if tooling else None
    async for index, event in jobs.events():
        _check(event, jobs)
        if not event.text and event.finish_reason is None and not body.logprobs:
            continue
        one = Choice(index)
        one.add(event)
        logprobs = convert.chat_logprobs(one, service.tokenizer) if body.logprobs else None
        if streams:  # content and tool-call pieces (none while a tag may be starting)
            deltas = streams[index].deltas(event.text, event.finish_reason)
        else:
            deltas = [{"content": event.text or None, "finish_reason": event.finish_reason}]
        if logprobs and not deltas:
            deltas = [{}]  # the token's logprobs still go out
        for delta in deltas:  # the logprobs ride on the first chunk
            delta = convert.chat_delta(index, logprobs=logprobs, **delta)
            yield convert.sse(convert.chat_chunk(**meta, choices=[delta]))
            logprobs = None
        completion_tokens += event.completion_tokens
    if include:
        meta["include_usage"] = False
        yield convert.sse(
            convert.chat_chunk(
                **meta, choices=[], usage=convert.usage(prompt_tokens, completion_tokens)
            )
        )
    yield convert.sse("[DONE]")


async def _completions(fleet: Fleet, request: Request):  # noqa: ANN202 - JSON or a stream
    body = parse(CompletionRequest, await read_body(request, fleet.max_body))
    service, adapter = await fleet.acquire(request, body.model)
    adapter = chosen(service.adapters, adapter=adapter, lora=body.lora)
    # Tokenizing megabytes of text takes seconds: off the event loop, which keeps serving.
    jobs, prompts = await run_in_threadpool(_completion_jobs, service, body, adapter)
    jobs.submit()
    if body.stream:
        return _stream(_completion_events(service, body, jobs, prompts), jobs)
    choices = await _collect(jobs, request, len(jobs.requests))
    out = []
    for c in choices:
        prompt = prompts[c.index // body.n]
        echo = service.tokenizer.decode(prompt) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            echoed = prompt if body.echo else None
            logprobs = convert.completion_logprobs(c, service.tokenizer, prompt=echoed)
        text = echo + "".join(c.text)
        out.append(
            convert.completion_choice(
                c.index, text, logprobs=logprobs, finish_reason=c.finish_reason
            )
        )
    prompt_tokens = sum(len(p) for p in prompts)
    usage = convert.usage(prompt_tokens, sum(c.completion_tokens for c in choices))
    return convert.completion_response(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=service.model_id(jobs.adapter),
        choices=out,
        usage=usage,
    )


async def _chat(fleet: Fleet, request: Request):  # noqa: ANN202 - JSON or a stream
    body = parse(ChatCompletionRequest, await read_body(request, fleet.max_body))
    service, adapter = await fleet.acquire(request, body.model)
    adapter = chosen(service.adapters, adapter=adapter, lora=body.lora)
    # The template is code from the model file: rendering (and tokenizing) off the loop.
    jobs, prompt_tokens, tooling = await run_in_threadpool(_chat_jobs, service, body, adapter)
    jobs.submit()
    if body.stream:
        return _stream(_chat_events(service, body, jobs, prompt_tokens, tooling), jobs)
    choices = await _collect(jobs, request, body.n)
    out = []
    for c in choices:
        message, finish = None, c.finish_reason
        if tooling:
            message, finish = tools.message("".join(c.text), c.finish_reason, tooling)
        logprobs = convert.chat_logprobs(c, service.tokenizer) if body.logprobs else None
        out.append(
            convert.chat_choice(
                c.index, "".join(c.text), finish_reason=finish, logprobs=logprobs, message=message
            )
        )
    usage = convert.usage(prompt_tokens, sum(c.completion_tokens for c in choices))
    return convert.chat_response(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=service.model_id(jobs.adapter),
        choices=out,
        usage=usage,
    )


async def _embeddings(fleet: Fleet, request: Request) -> dict:
    body = parse(EmbeddingRequest, await read_body(request, fleet.max_body))
    service, _adapter = await fleet.acquire(request, body.model)
    if body.dimensions is not None:
        raise ApiError(
            "dimensions is not supported: the vectors have the model's width", param="dimensions"
        )
    batches = await run_in_threadpool(_embedding_ids, service, body)
    vectors = await service.embedder.run(
        batches, timeout=service.timeout, disconnected=request.is_disconnected
    )
    return convert.embedding_response(
        vectors,
        model=service.name,
        encoding_format=body.encoding_format,
        prompt_tokens=sum(len(ids) for ids in batches),
    )


def _embedding_ids(service: Service, body: EmbeddingRequest) -> list[list[int]]:
    """The inputs as token ids, within the caps on inputs and tokens (OpenAI's)."""
    limits = service.limits
    many = isinstance(body.input, list) and body.input and not isinstance(body.input[0], int)
    if many and len(body.input) > limits.max_embedding_inputs:
        raise ApiError(
            f"at most {limits.max_embedding_inputs} inputs per request (got {len(body.input)})",
            param="input",
        )
    strings = isinstance(body.input, str) or (many and isinstance(body.input[0], str))
    if strings and body.truncate_prompt_tokens is None:  # else cut, not refused
        service.check_prompt_bytes(
            [body.input] if isinstance(body.input, str) else body.input, param="input"
        )
    # An embedding takes no new token, so -1 keeps a whole window (truncate_prompt keeps
    # room for one new token in the window it is given).
    batches = [
        convert.truncate_prompt(
            ids,
            body.truncate_prompt_tokens,
            max_tokens=None,
            context_length=service.context_length + 1,
        )
        for ids in convert.prompt_ids(body.input, service.tokenizer, vocab_size=service.vocab_size)
    ]
    for ids in batches:  # refuse what does not fit the window, as generation does
        convert.token_budget(
            prompt_tokens=len(ids) - 1, max_tokens=None, context_length=service.context_length
        )
    if (total := sum(len(ids) for ids in batches)) > limits.max_embedding_tokens:
        raise ApiError(
            f"at most {limits.max_embedding_tokens:,} tokens per request (got {total:,})",
            param="input",
        )
    return batches


def _api_routes(fleet: Fleet) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key(fleet))])

    def entry(name: str, adapter: str | None = None) -> dict:
        loaded = fleet.loaded.get(name)
        created = loaded.service.created if loaded else fleet.created
        shown = model_id(name, adapter)  # a LoRA adapter's model: "NAME:ADAPTER"
        return convert.model_entry(shown, created=created, loaded=loaded is not None)

    @router.get("/models")
    async def models() -> dict:  # every model it can serve; `loaded`: in memory now
        listed = [(s.name, a) for s in fleet.specs.values() for a in (None, *s.adapters)]
        return {"object": "list", "data": [entry(*model) for model in listed]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        spec, adapter = fleet.resolve(model_id)
        return entry(spec.name, adapter)

    @router.post("/completions")
    async def completions(request: Request):  # noqa: ANN202 - JSON or a stream
        return await _completions(fleet, request)

    @router.post("/chat/completions")
    async def chat(request: Request):  # noqa: ANN202 - JSON or a stream
        return await _chat(fleet, request)

    @router.post("/embeddings")
    async def embeddings(request: Request) -> dict:
        return await _embeddings(fleet, request)

    return router


def _metrics(fleet: Fleet) -> str:
    snapshots = {
        name: {**e.service.scheduler.snapshot(), **e.service.embedder.snapshot()}
        for name, e in fleet.loaded.items()
    }
    if len(fleet.specs) == 1:  # one model: its series, unlabelled
        return convert.prometheus(snapshots.get(fleet.default, {}))
    return convert.prometheus_by_model(snapshots)  # a series per loaded model, by name


def create_app(served: Service | Fleet) -> FastAPI:
    """The ASGI app for one model (a Service) or several (a Fleet); starts the models'
    scheduler threads on startup and stops them on shutdown."""
    fleet = served if isinstance(served, Fleet) else Fleet.of(served)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fleet.start()
        yield
        fleet.stop()

    app = FastAPI(title="pocketlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(_api_routes(fleet))
    for api in (ollama, anthropic, tokens):  # the other APIs it speaks, on the same engine
        app.include_router(api.router(fleet))
    openapi.describe(app)
    app.add_middleware(Leases, fleet=fleet)  # holds each request's model until it is answered
    if fleet.limits.cors_origin:  # only the origin asked for; none by default
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[fleet.limits.cors_origin],
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(Guard, limits=fleet.limits)  # the outermost: before CORS, routes

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody reads it: the body never came in full

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body(f"internal error: {error}", type="server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": fleet.default, "loaded": [*fleet.loaded]}

    @app.get("/metrics", dependencies=[Depends(require_key(fleet))])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(fleet), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(
            (resources.files("pocketlm.serve") / "static" / "index.html").read_text("utf-8")
        )

    return app
