"""The engine requests behind one HTTP request, shared by every API the server speaks
(OpenAI's, Ollama's, Anthropic's): submit them to the scheduler, read their events back on
the event loop, cancel them when the client goes away; and the request body, read within
the server's size limit. Failures are `ApiError`s; each API's routes put them in its own
error shape. Knows nothing of any wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request

from pocketlm.serve import convert
from pocketlm.serve.convert import Choice
from pocketlm.serve.guard import authorized
from pocketlm.serve.scheduler import Event, QueueFull, Scheduler
from pocketlm.serve.scheduler import Request as EngineRequest
from pocketlm.serve.schemas import ApiError
from pocketlm.tokenizer import Tokenizer


class Served(Protocol):
    """A loaded model's `Service` (pocketlm.serve.app), as the jobs and each API's routes
    see it: the model, its scheduler and its limits (the server-wide ones, the API key and
    the body's size, are the `Fleet`'s)."""

    lm: Any  # pocketlm.LM
    tokenizer: Tokenizer
    name: str
    vocab_size: int
    context_length: int
    scheduler: Scheduler
    timeout: float | None
    created: int  # when it was loaded (Unix time)

    adapters: Any  # pocketlm.generate.multilora.MultiLoRA: its LoRA adapters, or None

    def model_id(self, adapter: str | None) -> str: ...

    embedder: Any  # pocketlm.serve.embedder.Embedder: embeddings, queued and capped

    def embed(self, batches: list[list[int]]) -> list[list[float]]: ...

    def check_prompt_bytes(self, texts: list, param: str = "prompt") -> None: ...

    def close(self) -> None: ...


class Keyed(Protocol):
    """The server's settings (`pocketlm.serve.fleet.Fleet`) as the key check sees them."""

    api_key: str | None


class Jobs:
    """The engine requests (one per choice) behind one HTTP request, and their events."""

    def __init__(self, service: Served, *, adapter: str | None = None) -> None:
        self.service = service
        self.adapter = adapter  # the LoRA adapter every request here runs with (None: none)
        self.loop: asyncio.AbstractEventLoop | None = None  # set by submit(), on the loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests: list[EngineRequest] = []

    def add(self, index: int, **options: object) -> None:
        def emit(event: Event) -> None:
            # RuntimeError: the event loop has closed, the server is shutting down.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        self.requests.append(
            EngineRequest(
                emit=emit, timeout=self.service.timeout, group=self, adapter=self.adapter, **options
            )
        )

    def submit(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            self.service.scheduler.submit(self.requests)
        except QueueFull:
            raise ApiError.busy("too many requests are waiting") from None

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        remaining = len(self.requests)
        while remaining:
            index, event = await self.queue.get()
            if event.finish_reason is not None:
                remaining -= 1
            yield index, event

    def cancel(self) -> None:
        for request in self.requests:
            self.service.scheduler.cancel(request)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(
            f"the request body is larger than the server's limit of {limit} bytes", status=413
        )
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(
                f"the request body is larger than the server's limit of {limit} bytes", status=413
            )
    return bytes(body)


async def collect(jobs: Jobs, request: Request, count: int) -> list[Choice]:
    """Wait for every choice to finish; cancel them if the client goes away meanwhile."""
    choices = [Choice(i) for i in range(count)]
    try:
        async for index, event in jobs.events():
            choices[index].add(event)
            if await request.is_disconnected():
                break
    finally:
        jobs.cancel()
    for choice in choices:
        if failure := convert.engine_failure(choice.finish_reason, timeout=jobs.service.timeout):
            raise failure
    return choices


def require_key(fleet: Keyed) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: the request must carry the server's API key (when it has one)."""

    async def authorize(request: Request) -> None:
        if not authorized(request.headers.get("authorization"), fleet.api_key):
            raise ApiError(
                "incorrect or missing API key: send 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
            )

    return authorize
