"""Embedding requests, run in turn on one worker thread with the limits generation has:
a bounded queue (429 beyond it), the request time limit (504), and cancellation when the
client goes away. Inputs run a few at a time; between two groups a cancelled or expired
request stops, so an abandoned request of 2,048 inputs frees the model within one group.
Knows nothing of HTTP beyond the errors it reports in OpenAI's format, or of how the
vectors are computed (the `embed` function it is given).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from pocketlm.serve.schemas import ApiError

_GROUP = 16  # inputs embedded between two checks for cancellation and time
_POLL = 0.1  # seconds between two looks at the client's connection


class _Stopped(Exception):
    """A job's client left or its time ran out; the worker stops between groups."""


class Embedder:
    """One worker thread; `run` awaits a job's vectors or raises ApiError."""

    def __init__(
        self, embed: Callable[[list[list[int]]], list[list[float]]], *, max_queue: int
    ) -> None:
        self.embed, self.max_queue = embed, max_queue
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pocketlm-embed")
        self._lock = threading.Lock()
        self._pending = 0  # jobs waiting or running
        self.counters = {"embedding_requests": 0, "embedding_inputs": 0}

    def snapshot(self) -> dict[str, int]:
        """Counters for /metrics."""
        with self._lock:
            return dict(self.counters)

    def close(self) -> None:
        """Stop the worker thread (the model is unloading); jobs not started are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(
        self,
        batches: list[list[int]],
        *,
        timeout: float | None,
        disconnected: Callable[[], Awaitable[bool]],
    ) -> list[list[float]]:
        with self._lock:
            if self._pending >= self.max_queue:
                raise ApiError.busy("too many embedding requests are waiting")
            self._pending += 1
            self.counters["embedding_requests"] += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        stop = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, self._work, batches, deadline, stop
        )
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=_POLL)
                if not future.done() and await disconnected():
                    stop.set()
                    raise ApiError("the client went away", status=499)
            return future.result()
        except _Stopped:
            raise ApiError(
                f"the request took longer than the server's limit of {timeout:g} s",
                status=504,
                type="timeout_error",
                code="timeout",
            ) from None
        finally:
            stop.set()  # a job still waiting for the worker is dropped when it gets there

    def _work(
        self, batches: list[list[int]], deadline: float | None, stop: threading.Event
    ) -> list[list[float]]:
        try:
            vectors: list[list[float]] = []
            for start in range(0, len(batches), _GROUP):
                if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                    raise _Stopped
                vectors += self.embed(batches[start : start + _GROUP])
                with self._lock:
                    self.counters["embedding_inputs"] += len(batches[start : start + _GROUP])
            return vectors
        finally:
            with self._lock:
                self._pending -= 1
