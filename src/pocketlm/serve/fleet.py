"""Several models behind one server: which one a request names, loading it on first use,
unloading it when idle or when memory runs short.

`Fleet` holds the models the server can serve (`Spec`: the name requests use, the
checkpoint on disk) and those loaded now, each a `Service` (app.py) with its own scheduler
thread. A request's `model` picks one (`Fleet.resolve`: none, or the first model's name,
is the first model); `Fleet.acquire` loads it if it is not loaded -- in a worker thread,
so the event loop keeps answering the other models, and a second request for a model that
is loading waits for that same load -- and holds it until the response has gone out (the
`Leases` middleware lets go). A model idle for its keep-alive is unloaded (Ollama's
keep_alive), and so is the least recently used idle one when loading another would pass
the memory budget; a model that is answering a request is never unloaded.

Knows nothing of any wire format beyond the ApiErrors it raises, nor how a model is loaded
(the `load` function it is given). (Ollama's server/sched.go: loads on demand, keep_alive,
least-recently-used eviction under a memory limit.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from pocketlm.errors import PocketLMError
from pocketlm.serve.guard import Limits
from pocketlm.serve.jobs import Served as Service  # app.py's Service, as the routes see it
from pocketlm.serve.schemas import ApiError
from pocketlm.weights import sources
from pocketlm.weights.card import describe, human_bytes

log = logging.getLogger("pocketlm.serve")

KEEP_ALIVE = 300.0  # seconds an idle model stays loaded when there are several (Ollama's 5m)
_LEASES = "pocketlm.leases"  # the scope key of the models a request holds


@dataclass(frozen=True)
class Spec:
    """A model the server can serve: the name requests use and its checkpoint."""

    name: str
    path: Path  # an HF-layout folder or a .gguf file
    adapters: tuple[str, ...] = ()  # LoRA adapters served over it, as "name:adapter"


def served_name(given: str) -> str:
    """The name a model is served under: a path's last part ("SmolLM2.gguf"), else the
    name or hub id as given."""
    return Path(given).name if Path(given).exists() else given


def model_id(name: str, adapter: str | None) -> str:
    """The model a LoRA adapter of model `name` is served as, "NAME:ADAPTER" (which
    `Fleet.resolve` splits again); the model's own name without one."""
    return name if adapter is None else f"{name}:{adapter}"


def models_in(folder: Path) -> list[Spec]:
    """Every model in `folder` (--models-dir): each .gguf file and each folder holding a
    config.json or a .gguf, named as pocketlm names a path: its last part."""
    if not folder.is_dir():
        raise PocketLMError(f"--models-dir {folder}: no such folder")
    found = [
        Spec(p.name, sources.resolve(str(p)))  # a folder's one .gguf, or the folder
        for p in sorted(folder.iterdir())
        if (p.is_file() and p.suffix == ".gguf")
        or (p.is_dir() and ((p / "config.json").is_file() or any(p.glob("*.gguf"))))
    ]
    if not found:
        raise PocketLMError(f"--models-dir {folder} holds no model (.gguf files or HF folders)")
    return found


def held_bytes(model) -> int:  # noqa: ANN001 - a torch module
    """Bytes the model's weights hold in memory (quantized ones as stored)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate(path: Path, *, dtype: str | None, quantize: str | None) -> int:
    """Bytes a model's weights will hold once loaded so, from its card (headers only):
    the budget's guess before a first load; the load measures the real size."""
    card = describe(path)
    if quantize is not None:
        return card.ram_int8 if quantize == "int8" else card.ram_int4
    if dtype is not None:
        return card.ram_fp32 if dtype == "fp32" else card.ram_bf16
    return card.ram_default


_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def keep_alive_seconds(value: float | str) -> float | None:
    """Seconds from Ollama's keep_alive: a number of seconds or a duration ("5m", "1h30m",
    "300ms"); negative means never unload (None)."""
    if isinstance(value, str):
        text = value.strip()
        sign = -1 if text.startswith("-") else 1
        try:
            value = float(text)
        except ValueError:
            parts = _DURATION.findall(text.lstrip("-"))
            if not parts or "".join(n + u for n, u in parts) != text.lstrip("-"):
                raise ApiError(
                    f"keep_alive {text!r} is not a duration such as 300, '5m' or '1h'",
                    param="keep_alive",
                ) from None
            value = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    return None if value < 0 else float(value)


@dataclass
class Loaded:
    """A loaded model: its service, the bytes its weights hold, who is using it."""

    service: Service
    size: int
    keep_alive: float | None  # seconds idle before it unloads; None: never
    users: int = 0  # requests holding it (until their responses have gone out)
    last_used: float = field(default_factory=time.monotonic)

    def expires(self) -> float | None:
        """When (time.monotonic) it unloads if nothing uses it meanwhile; None: not now."""
        if self.users or self.keep_alive is None:
            return None
        return self.last_used + self.keep_alive


class Fleet:
    """The models a server serves, loaded on demand within a keep-alive and a budget.

    Everything here runs on the event loop except the loads and unloads themselves,
    which run in worker threads; so no lock: the loop is the only writer."""

    def __init__(
        self,
        specs: list[Spec],
        *,
        load: Callable[[Spec], Service],
        keep_alive: float | None = KEEP_ALIVE,
        budget: int | None = None,
        estimate: Callable[[Spec], int] = lambda spec: 0,
        api_key: str | None = None,
        limits: Limits = Limits(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self.specs: dict[str, Spec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise PocketLMError(
                    f"two models are named '{spec.name}': {self.specs[spec.name].path} and "
                    f"{spec.path}; serve one of them"
                )
            self.specs[spec.name] = spec
        self.default = specs[0].name  # for a request that names no model
        self.load, self.estimate = load, estimate
        self.keep_alive, self.budget = keep_alive, budget
        # The server-wide limits, the same for every model.
        self.api_key, self.limits, self.max_body = api_key, limits, limits.max_body
        self.loaded: dict[str, Loaded] = {}
        self.sizes: dict[str, int] = {}  # measured by an earlier load: better than a guess
        self._loading: dict[str, asyncio.Future] = {}
        self._reserved: dict[str, int] = {}  # the guessed sizes of the loads under way
        self._wake: asyncio.Event | None = None  # wakes the reaper: a model fell idle
        self._reaper: asyncio.Task | None = None
        self.created = int(time.time())

    @classmethod
    def of(cls, service: Service) -> Fleet:
        """One model, loaded and never unloaded: the server of `pocketlm serve MODEL`."""
        adapters = tuple(service.adapters.names) if service.adapters is not None else ()
        fleet = cls(
            [Spec(service.name, Path(service.lm.path), adapters)],
            load=lambda spec: service,
            keep_alive=None,
            api_key=service.api_key,
            limits=service.limits,
        )
        fleet.add(service)
        return fleet

    def add(self, service: Service) -> None:
        """A model loaded before the server starts (the first one); started with it."""
        size = self._enter(service.name, service)
        if self.budget is not None and size > self.budget:
            raise PocketLMError(self._too_big(service.name, size).message)

    # -- names --

    def resolve(self, model: str | None) -> tuple[Spec, str | None]:
        """The model and the LoRA adapter a request's `model` names. None, or the first
        model's name: the first model. An exact name first (Ollama's names hold colons,
        "llama3:8b"); else NAME:ADAPTER split at the last colon, where Ollama's default
        tag ":latest" names no adapter."""
        if model is None:
            return self.specs[self.default], None
        if model in self.specs:
            return self.specs[model], None
        base, _, adapter = model.rpartition(":")
        spec = self.specs.get(base)
        if spec is not None and adapter == "latest":
            return spec, None
        if spec is not None and adapter in spec.adapters:
            return spec, adapter
        if spec is not None:
            known = ", ".join(f"'{base}:{a}'" for a in spec.adapters) or "none"
            raise ApiError(
                f"the model '{base}' has no adapter '{adapter}' (its adapters: {known})",
                status=404,
                param="model",
                code="model_not_found",
            )
        names = ", ".join(f"'{name}'" for name in self.specs)
        raise ApiError(
            f"the model '{model}' does not exist; this server runs {names}",
            status=404,
            param="model",
            code="model_not_found",
        )

    # -- a request's model --

    async def acquire(
        self, request: Request, model: str | None, *, keep_alive: float | str | None = None
    ) -> tuple[Service, str | None]:
        """(the loaded service, the adapter's name or None) for a request's `model`, held
        until its response has gone out. Loads it first if need be; `keep_alive`
        (Ollama's, per request) sets how long it stays loaded once idle."""
        spec, adapter = self.resolve(model)
        seconds = None if keep_alive is None else keep_alive_seconds(keep_alive)
        while (entry := self.loaded.get(spec.name)) is None:
            # Awaited, not run here: a request that leaves does not cancel a load others
            # wait for. Looked up again after: another load may have evicted it meanwhile.
            await asyncio.shield(self._loading_of(spec))
        entry.users += 1
        request.scope[_LEASES].append(entry)
        if keep_alive is not None:
            entry.keep_alive = seconds
        return entry.service, adapter

    def release(self, entry: Loaded) -> None:
        entry.users -= 1
        entry.last_used = time.monotonic()
        if self._wake is not None:
            self._wake.set()

    def _loading_of(self, spec: Spec) -> asyncio.Future:
        if spec.name not in self._loading:
            task = asyncio.ensure_future(self._load(spec))
            self._loading[spec.name] = task
            task.add_done_callback(lambda done: self._loaded(spec.name, done))
        return self._loading[spec.name]

    def _loaded(self, name: str, task: asyncio.Future) -> None:
        del self._loading[name]
        # retrieved here, so a failure that no request waits for any more is still told
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("loading %s failed: %s", name, error)

    def _guess(self, spec: Spec) -> int:
        """Bytes a model will hold: as measured last time, else as its card says."""
        try:
            return self.sizes.get(spec.name) or self.estimate(spec)
        except PocketLMError:  # a card unread: the load itself will say what is wrong
            return 0

    async def _load(self, spec: Spec) -> None:
        need = await asyncio.to_thread(self._guess, spec)
        if self.budget is not None and need > self.budget:
            raise self._too_big(spec.name, need)
        await self._make_room(need, keep=spec.name)
        self._reserved[spec.name] = need
        try:
            # No local name keeps the service: an unload must leave nothing holding it.
            size = self._enter(spec.name, await asyncio.to_thread(self._start, spec))
        finally:
            del self._reserved[spec.name]
        log.info("loaded %s (%s)", spec.name, human_bytes(size))
        try:  # the guess was low: make room for what it really holds, or give it back
            if self.budget is not None and size > self.budget:
                raise self._too_big(spec.name, size)
            await self._make_room(0, keep=spec.name)
        except ApiError:
            await self._unload(spec.name)
            raise
        if self._wake is not None:
            self._wake.set()

    def _enter(self, name: str, service: Service) -> int:
        """Count a model loaded; the bytes it holds."""
        loaded = Loaded(service, held_bytes(service.lm.model), keep_alive=self.keep_alive)
        self.loaded[name] = loaded
        self.sizes[name] = loaded.size
        return loaded.size

    def _start(self, spec: Spec) -> Service:
        """Load a model and start its scheduler (in a worker thread)."""
        try:
            service = self.load(spec)
        except (PocketLMError, ValueError) as error:
            raise ApiError(
                f"cannot load the model '{spec.name}': {error}", status=500, type="server_error"
            ) from None
        service.scheduler.start()
        return service

    async def _make_room(self, need: int, *, keep: str) -> None:
        """Unload idle models, least recently used first, until `need` more bytes fit
        the budget; a 503 when only models answering requests are left to unload."""
        if self.budget is None:
            return
        while self._used(keep) + need > self.budget:
            idle = [(e.last_used, n) for n, e in self.loaded.items() if n != keep and not e.users]
            if not idle:
                busy = ", ".join(f"'{n}'" for n in self.loaded if n != keep)
                raise ApiError(
                    f"not enough memory to load '{keep}' within --models-ram "
                    f"{human_bytes(self.budget)}: {busy or 'other loads'} in use; retry shortly",
                    status=503,
                    type="server_error",
                    code="models_busy",
                    headers={"Retry-After": "1"},
                )
            await self._unload(min(idle)[1])

    def _used(self, keep: str) -> int:
        loading = sum(size for name, size in self._reserved.items() if name != keep)
        return sum(e.size for e in self.loaded.values()) + loading

    def _too_big(self, name: str, size: int) -> ApiError:
        return ApiError(
            f"the model '{name}' needs {human_bytes(size)}, more than --models-ram "
            f"{human_bytes(self.budget or 0)} allows for all models together; start the "
            "server with a larger --models-ram",
            status=503,
            type="server_error",
            code="model_too_large",
        )

    async def _unload(self, name: str) -> None:
        entry = self.loaded.pop(name)
        log.info("unloading %s", name)
        await asyncio.to_thread(entry.service.close)
        weights = weakref.ref(entry.service.lm.model)
        del entry  # the last reference here; what cycles still hold goes in _free
        await asyncio.to_thread(_free, weights)

    # -- the server's life --

    def start(self) -> None:
        """On the server's event loop: start the models loaded already, and the reaper."""
        for entry in self.loaded.values():
            entry.service.scheduler.start()
        self._wake = asyncio.Event()
        self._reaper = asyncio.ensure_future(self._reap())

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for entry in self.loaded.values():
            entry.service.scheduler.stop()

    def cancel_all(self) -> None:
        """Cancel every request of every model (a server draining at shutdown)."""
        for entry in list(self.loaded.values()):
            entry.service.scheduler.cancel_all()

    async def _reap(self) -> None:
        """Unload each model whose keep-alive has run out since its last request."""
        while True:
            # Looked for again after each unload, whose await let requests come meanwhile;
            # by name, as a model held in a local name here would never be freed.
            while expired := [n for n, e in self.loaded.items() if _past(e.expires())]:
                try:
                    await self._unload(expired[0])
                except Exception:  # noqa: BLE001 - the reaper must outlive one failure
                    log.exception("unloading %s failed", expired[0])
            self._wake.clear()
            times = [at for e in self.loaded.values() if (at := e.expires()) is not None]
            wait = max(0.0, min(times) - time.monotonic()) if times else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def expires_at(self, entry: Loaded) -> float | None:
        """When (time.time) `entry` unloads if nothing uses it meanwhile; None: not now."""
        at = entry.expires()
        return None if at is None else time.time() + (at - time.monotonic())


def _past(at: float | None) -> bool:
    return at is not None and at <= time.monotonic()


def _free(weights: weakref.ref) -> None:
    """Give an unloaded model's memory back. A served request's jobs and engine requests
    refer to each other (and so to the service) until the garbage collector frees them:
    the young generations first (cheap); a full collection only if the weights are still
    held, as it holds the interpreter a moment (0.2 s in a bare `pocketlm serve`, more in
    a bigger process). Then the CUDA allocator's cached blocks."""
    gc.collect(1)
    if weights() is not None:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Leases:
    """ASGI middleware: the models a request acquired are let go once its response has
    gone out, a stream included, or its client has gone away: so a model is never
    unloaded while it is answering."""

    def __init__(self, app: ASGIApp, *, fleet: Fleet) -> None:
        self.app, self.fleet = app, fleet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list[Loaded] = []
        scope[_LEASES] = held
        try:
            await self.app(scope, receive, send)
        finally:
            for entry in held:
                self.fleet.release(entry)
            held.clear()  # a scope kept after its response must not keep a model alive
