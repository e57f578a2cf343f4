"""`pocketlm serve [MODEL]`: serve a model over an OpenAI-compatible HTTP API (and a chat
page at /), with continuous batching (a model running through transformers answers one
request at a time, in turn). Parsing and printing only; the server is
`pocketlm.serve.app`, run by uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from typing import TYPE_CHECKING

from pocketlm.cli import common
from pocketlm.errors import PocketLMError

if TYPE_CHECKING:
    from pocketlm.serve.guard import Limits


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve MODEL (default: the embedded SmolLM2-135M) at http://HOST:PORT/v1 "
        "for the openai client and other programs; a chat page is at http://HOST:PORT/.",
    )
    parser.add_argument("model", nargs="?", default=None, help="model name, folder or .gguf file")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="comma-separated host names to accept in the Host header besides localhost and "
        "loopback addresses (default: only those when bound to loopback; any name otherwise)",
    )
    parser.add_argument(
        "--cors-origin",
        default=None,
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API "
        "(default: no cross-origin access)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests decoded together (default 8; 1 for a model running through transformers)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests allowed to wait for a slot; beyond it, 429 (default 64)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a request may take (default 600)"
    )
    parser.add_argument(
        "--name", default=None, help="model id the API reports (default: the model's name)"
    )
    common.add_model_options(parser)
    parser.set_defaults(handler=main)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (so --port 0 can report the port it got)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every keep-alive response after the first waits ~40 ms (Nagle and
    # delayed ACKs, as the headers and the body go out in two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise PocketLMError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(128)
    return sock


def limits(args: argparse.Namespace) -> Limits:
    """The server's limits: the defaults, and the Host names and origin asked for."""
    from pocketlm.serve.guard import Limits

    names = tuple(n.strip().lower() for n in (args.allowed_hosts or "").split(",") if n.strip())
    # Bound to loopback, only this machine's names can reach it -- unless a DNS-rebinding
    # page does: check the Host. Bound beyond it, any name may be right, unless told.
    check = is_loopback(args.host) or args.allowed_hosts is not None
    return Limits(allowed_hosts=names if check else None, cors_origin=args.cors_origin)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    for flag in ("max_batch", "max_queue"):
        if getattr(args, flag) < 1:
            raise PocketLMError(f"--{flag.replace('_', '-')} must be at least 1")
    if getattr(args, "draft", None):
        raise PocketLMError("serve batches requests instead of drafting: drop --draft")
    if args.timeout <= 0:
        raise PocketLMError("--timeout must be positive")
    if args.api_key is not None and not args.api_key.strip():
        raise PocketLMError("--api-key is empty: give a key, or leave the flag out")
    if args.cors_origin is not None and not args.cors_origin.startswith(("http://", "https://")):
        raise PocketLMError("--cors-origin must be an origin such as http://localhost:3000")
    try:
        from pocketlm.serve import guard
        from pocketlm.serve.app import Service, create_app
    except ImportError as error:
        raise PocketLMError(f"serving needs {error.name}: pip install 'pocketlm[serve]'") from None
    log = logging.getLogger("pocketlm")
    if not is_loopback(args.host) and not args.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this machine can use the model",
            args.host,
        )
    lm = common.load_model(args.model, args)
    sock = bind(args.host, args.port)
    try:
        service = Service(
            lm,
            name=args.name,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            timeout=args.timeout,
            api_key=args.api_key,
            limits=limits(args),
        )
    except ValueError as error:
        raise PocketLMError(f"cannot serve this model: {error}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {service.name} at http://{shown}:{port}/v1 (chat page: http://{shown}:{port}/)",
        flush=True,
    )
    server = guard.server(
        create_app(service), limits=service.limits, cancel_all=service.scheduler.cancel_all
    )
    server.run(sockets=[sock])
    sys.stdout.flush()
    return 0
