"""The server's request log: one line per request on stderr, when its response has ended.

    GET /v1/models 200 3 ms
    POST /v1/chat/completions 200 1840 ms

A plain ASGI wrapper around the app (so a streamed answer is timed to its last byte,
and an error the app turns into a response is logged with its status), written to the
"pocketlm.requests" logger; `pocketlm serve --quiet` leaves it out. Knows nothing of
models or of the routes.
"""

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("pocketlm.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestLog:
    """Wraps an ASGI app; HTTP requests are logged, everything else passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it answers

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            log.info("%s %s %d %.0f ms", scope["method"], scope["path"], status, elapsed)
