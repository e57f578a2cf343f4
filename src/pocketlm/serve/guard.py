"""The server's edge: what a request must look like before any route reads it, and the
connection deadlines uvicorn does not keep.

- `Limits`: every limit the server enforces, with its default (the README's table).
- `Guard` (ASGI middleware): a Host header naming this machine when bound to loopback
  (a DNS-rebinding page at http://evil.example:PORT resolves to 127.0.0.1 but still sends
  `Host: evil.example`), `Content-Type: application/json` on POST (a cross-origin "simple"
  request -- a form, fetch `no-cors` -- cannot send it, so a web page cannot make the
  server generate), and no CORS headers unless `cors_origin` names an origin.
- `authorized`: the API key compared in constant time.
- `Connection`: uvicorn's h11 connection with a deadline for each phase of a request
  (idle, headers, body), and malformed requests answered in OpenAI's JSON error format.
- `DrainingServer`: on SIGTERM, open streams finish (up to `Limits.drain`), then the rest
  are cancelled, so each stream still ends with an event.

Knows nothing of models or generation. (Starlette's TrustedHostMiddleware and
CORSMiddleware; the Host check of Jupyter's and Ollama's servers; nginx's
client_header_timeout / client_body_timeout / keepalive_timeout.)
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pocketlm.serve.schemas import error_body

log = logging.getLogger("pocketlm.serve")


@dataclass(frozen=True)
class Limits:
    """What one request or connection may take; each is in the README's server section."""

    max_body: int = 4 << 20  # bytes of a request body (413 beyond)
    max_embedding_inputs: int = 2048  # inputs of one /v1/embeddings request (OpenAI's)
    max_embedding_tokens: int = 300_000  # tokens of one /v1/embeddings request (OpenAI's)
    header_timeout: float = 10.0  # s from a request's first byte to its last header line
    body_timeout: float = 30.0  # s from the headers to the body's last byte
    keep_alive: float = 5.0  # s an idle connection stays open (a new one too)
    drain: float = 30.0  # s open streams get to finish after SIGTERM
    # Host names accepted besides loopback ones; None: any Host (bound beyond loopback).
    allowed_hosts: tuple[str, ...] | None = ()
    cors_origin: str | None = None  # the one origin allowed cross-origin requests


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    """True for a Host header (with or without a port) that names this machine: localhost,
    *.localhost, a loopback address, or one of `allowed`. No header (HTTP/1.0) is allowed:
    every browser sends one."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:  # localhost:8000
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, key: str | None) -> bool:
    """True when no key is set, or `header` is 'Bearer <key>' (compared in constant time,
    so the time taken does not tell how much of a guess was right)."""
    if not key:
        return True
    return hmac.compare_digest((header or "").encode(), f"Bearer {key}".encode())


class Guard:
    """ASGI middleware: the Host check and the JSON-only rule for POST, before any route."""

    def __init__(self, app: ASGIApp, *, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        allowed = self.limits.allowed_hosts
        if allowed is not None and not host_allowed(headers.get("host"), allowed):
            return await _reply(
                send,
                403,
                f"the Host header {headers.get('host')!r} does not name this server; start it "
                "with --allowed-hosts NAME to accept requests addressed to NAME",
                code="host_not_allowed",
            )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return await _reply(
                    send,
                    415,
                    "send the body as JSON with 'Content-Type: application/json' "
                    f"(got {media or 'no Content-Type'})",
                    code="unsupported_media_type",
                )
        return await self.app(scope, receive, send)


async def _reply(send: Send, status: int, message: str, *, code: str) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response that closes the connection, for a connection h11 cannot
    answer through its state machine (no request line read yet)."""
    body = json.dumps(error_body(message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class Connection(H11Protocol):
    """uvicorn's h11 connection with a deadline per phase of each request: `keep_alive`
    while idle (uvicorn starts that one only after a first response), `header_timeout`
    from a request's first byte to its headers' end, `body_timeout` from there to the
    body's end. None while the app answers: a stream may run as long as the request's
    own time limit. A deadline missed is a 408 and a closed connection."""

    def __init__(self, *args: object, limits: Limits, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter("idle")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def _watch(self) -> None:
        """The deadline for where the client's side of the request stands now."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._enter("body")
        elif state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request line
            self._enter("headers")
        else:  # the app is answering, or nothing has come yet (uvicorn's keep-alive)
            self._enter(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # still reading the same headers or body: the deadline stands
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        seconds = {
            "idle": self.limits.keep_alive,
            "headers": self.limits.header_timeout,
            "body": self.limits.body_timeout,
        }.get(phase or "")
        if seconds is not None:
            self._timer = self.loop.call_later(seconds, self._expire, phase)

    def _expire(self, phase: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if phase != "idle":
            log.info("closing a connection that sent its %s too slowly", phase)
            message = f"the request's {phase} did not arrive within the server's time limit"
            self.transport.write(_raw_response(408, "Request Timeout", message))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts uvicorn's keep-alive timer, reads on
        self._watch()  # a pipelined request may be half in already

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a bad Content-Length, a broken request line):
        OpenAI's JSON error instead of uvicorn's plain text."""
        log.info("a malformed HTTP request: %s", msg)
        self.transport.write(_raw_response(400, "Bad Request", f"malformed HTTP request: {msg}"))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, on SIGTERM or Ctrl-C, lets open requests finish for up to
    `drain` seconds and then cancels the rest through `cancel_all`, so that every stream
    ends with an event (an error event) rather than being cut."""

    def __init__(self, config: uvicorn.Config, *, drain: float, cancel_all: Callable[[], None]):
        super().__init__(config)
        self.drain, self.cancel_all = drain, cancel_all

    async def shutdown(self, sockets: list | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain, self.cancel_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def server(app: ASGIApp, *, limits: Limits, cancel_all: Callable[[], None]) -> DrainingServer:
    """The uvicorn server for `app`, with the connection deadlines of `limits`."""
    config = uvicorn.Config(
        app,
        http=functools.partial(Connection, limits=limits),
        log_level="warning",
        timeout_keep_alive=max(1, round(limits.keep_alive)),
        # Past the drain, cancelled streams get a moment to send their last event.
        timeout_graceful_shutdown=max(1, round(limits.drain + 2)),
    )
    return DrainingServer(config, drain=limits.drain, cancel_all=cancel_all)
