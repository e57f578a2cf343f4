"""`pocketlm serve [MODEL ...]`: serve models over an OpenAI-compatible HTTP API (and
Ollama's and Anthropic's, and a chat page at /), with continuous batching (a model running
through transformers answers one request at a time, in turn). The first model loads at
start; others (more MODELs, --models-dir) when a request names them, and unload when
idle (--keep-alive) or to make room (--models-ram). Parsing and printing only; the server
is `pocketlm.serve.app` and `pocketlm.serve.fleet`, run by uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pocketlm.cli import common
from pocketlm.errors import PocketLMError
from pocketlm.serve import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    from pocketlm.serve.fleet import Fleet, Spec
    from pocketlm.serve.guard import Limits


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve MODEL (default: the embedded SmolLM2-135M) at http://HOST:PORT/v1 "
        "for the openai client and other programs; a chat page is at http://HOST:PORT/. "
        "With several models (more MODELs, --models-dir), a request's `model` picks one "
        "(none: the first); the first loads at start, the others on first use.",
    )
    parser.add_argument(
        "model",
        nargs="*",
        default=[],
        help="model names, folders or .gguf files (each served under its name: a folder's "
        "or file's last part)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)"
    )
    _add_access_options(parser)
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
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="new tokens for a request that does not say max_tokens "
        f"(default {DEFAULT_MAX_TOKENS}; a legacy /v1/completions request: 16, as OpenAI's)",
    )
    _add_fleet_options(parser)
    _add_lora_option(parser)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no request log (by default one line per request on stderr: method, path, "
        "status, time)",
    )
    common.add_model_options(parser)
    parser.set_defaults(handler=main)


def _add_fleet_options(parser: argparse.ArgumentParser) -> None:
    """The models' names and memory; with several, where more are, how long an idle one
    stays loaded, how much they may hold together."""
    parser.add_argument(
        "--name",
        default=None,
        help="model id the API reports for the first model (default: its name)",
    )
    parser.add_argument(
        "--cache-ram",
        type=ram_size,
        default=None,
        metavar="SIZE",
        help="memory for the prompt cache shared across requests, e.g. 512MB or 2GB (a plain "
        "number is MB; default 1GB; 0 turns it off)",
    )
    parser.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="also serve every model in DIR (each .gguf file and model folder, by its name)",
    )
    parser.add_argument(
        "--keep-alive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="unload a model idle this long (default: 300 with several models, never with one; "
        "negative: never); Ollama's per-request keep_alive overrides it",
    )
    parser.add_argument(
        "--models-ram",
        type=ram_size,
        default=None,
        metavar="SIZE",
        help="memory all loaded models' weights may take together, e.g. 8GB; loading one "
        "more unloads the least recently used idle ones (default: no limit)",
    )


def _add_lora_option(parser: argparse.ArgumentParser) -> None:
    """Adapters served unmerged beside the first model (pocketlm.serve.adapters)."""
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter folder (from `finetune --lora --adapter-only`) unmerged "
        'beside the (first) model; a request picks it with model "MODEL:NAME" or '
        '"lora": "NAME" (repeatable)',
    )


def _add_access_options(parser: argparse.ArgumentParser) -> None:
    """Who may call the server: its key, the Host names it answers, the web origins."""
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


_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def ram_size(text: str) -> int:
    """Bytes from '512MB', '2GB', '1.5G', '0' or '300' (MB), binary units as llama.cpp's."""
    number = text.strip().upper()
    for suffix in ("IB", "B"):  # after a unit only: "512B" is not 512 MB
        if number.endswith(suffix) and number[: -len(suffix)][-1:] in ("K", "M", "G"):
            number = number.removesuffix(suffix)
    unit = number[-1:] if number[-1:] in ("K", "M", "G") else ""
    try:
        value = float(number.removesuffix(unit))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 512MB or 2GB") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a memory size cannot be negative")
    return int(value * _UNITS[unit])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (so --port 0 can report the port it got), opened before the
    model loads: a port in use is reported at once, not after the load."""
    if not 0 <= port <= 65535:
        raise PocketLMError(f"--port {port} is not a port: use 1-65535 (0 picks a free one)")
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
    except UnicodeError as error:  # a host name no resolver can encode (e.g. too long)
        sock.close()
        raise PocketLMError(f"cannot listen on {host}:{port}: {error}") from None
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


def request_log(app):  # noqa: ANN001, ANN201 - an ASGI app in, one out
    """The app with its request log: one line per request on stderr, time-stamped."""
    from pocketlm.serve.requestlog import RequestLog, log

    if not any(isinstance(h, common.StderrHandler) for h in log.handlers):
        handler = common.StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not again with the warnings' "INFO:" prefix
    return RequestLog(app)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    for flag in ("max_batch", "max_queue", "max_tokens"):
        if getattr(args, flag) < 1:
            raise PocketLMError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        raise PocketLMError("--timeout must be positive")
    if args.api_key is not None and not args.api_key.strip():
        raise PocketLMError("--api-key is empty: give a key, or leave the flag out")
    if args.cors_origin is not None and not args.cors_origin.startswith(("http://", "https://")):
        raise PocketLMError("--cors-origin must be an origin such as http://localhost:3000")
    try:
        from pocketlm.serve import guard
        from pocketlm.serve.adapters import parse_options
        from pocketlm.serve.app import create_app
    except ImportError as error:
        raise PocketLMError(f"serving needs {error.name}: pip install 'pocketlm[serve]'") from None
    log = logging.getLogger("pocketlm")
    if not is_loopback(args.host) and not args.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this machine can use the model",
            args.host,
        )
    # The order is the cost: a model that is not there (a quick look), then the port,
    # then the load (seconds to minutes), so no mistake waits for the load to be told.
    models = find_models(args)
    loras = parse_options(args.lora)  # each adapter's config read before the load
    sock = bind(args.host, args.port)
    server = load_models(args, models, loras)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    others = [name for name in server.specs if name != server.default]
    also = f" (also {', '.join(others)}, loaded on first use)" if others else ""
    print(
        f"serving {server.default}{also} at http://{shown}:{port}/v1 "
        f"(chat page: http://{shown}:{port}/)",
        flush=True,
    )
    if loras:
        print(f"LoRA adapters: {', '.join(f'{server.default}:{a}' for a in loras)}", flush=True)
    app = create_app(server)
    if not args.quiet:
        app = request_log(app)
    guard.server(app, limits=server.limits, cancel_all=server.cancel_all).run(sockets=[sock])
    sys.stdout.flush()
    return 0


class Models(NamedTuple):
    """The models named on the command line (None: the default), their checkpoints, and
    those in --models-dir."""

    given: list[str | None]
    paths: list[Path]
    in_dir: list[Spec]


def find_models(args: argparse.Namespace) -> Models:
    """Where each model to serve is (a quick look, or a download for a hub id)."""
    from pocketlm.serve.fleet import models_in
    from pocketlm.weights import sources

    given = args.model or ([] if args.models_dir else [None])
    paths = [sources.resolve(model, offline=args.offline) for model in given]
    return Models(given, paths, models_in(Path(args.models_dir)) if args.models_dir else [])


def load_models(
    args: argparse.Namespace, models: Models, loras: dict[str, Path] | None = None
) -> Fleet:
    """The models to serve: the first loaded now (with the LoRA adapters `loras`), the
    others (more MODELs, --models-dir) when a request names them, each with the same
    options."""
    from pocketlm.serve.adapters import parse_options
    from pocketlm.serve.app import Service
    from pocketlm.serve.fleet import KEEP_ALIVE, Fleet, Spec, estimate, served_name

    options = dict(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout=args.timeout,
        api_key=args.api_key,
        limits=limits(args),
        **({} if args.cache_ram is None else {"cache_ram": args.cache_ram}),
        max_tokens=args.max_tokens,
    )

    def service(lm, name: str | None, loras: dict | None = None) -> Service:  # noqa: ANN001
        try:
            return Service(lm, name=name, loras=loras, **options)
        except ValueError as error:
            raise PocketLMError(f"cannot serve this model: {error}") from None

    given, in_dir = models.given, models.in_dir
    source, name = (given[0], None) if given else (str(in_dir[0].path), in_dir[0].name)
    loras = parse_options(args.lora) if loras is None else loras  # --lora, for the first
    first = service(common.load_model(source, args), args.name or name, loras)
    specs = [Spec(first.name, Path(first.lm.path), tuple(loras))]
    specs += [Spec(served_name(m), p) for m, p in zip(given[1:], models.paths[1:], strict=True)]
    specs += [s for s in in_dir if s.path not in {t.path for t in specs}]  # given twice: once
    keep_alive = args.keep_alive
    if keep_alive is None:  # one model stays, as it always did; several take turns
        keep_alive = KEEP_ALIVE if len(specs) > 1 else -1
    server = Fleet(
        specs,
        load=lambda spec: service(
            common.load_model(str(spec.path), args),
            spec.name,
            loras if spec.name == first.name else None,  # reloaded after an unload
        ),
        keep_alive=None if keep_alive < 0 else keep_alive,
        budget=args.models_ram,
        estimate=lambda spec: estimate(spec.path, dtype=args.dtype, quantize=args.quantize),
        api_key=args.api_key,
        limits=options["limits"],
    )
    server.add(first)
    return server
