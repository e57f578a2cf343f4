"""`pocketlm ps`: the models a running `pocketlm serve` holds in memory now, how much
each takes and when it unloads. Asks the server's GET /api/ps (Ollama's route, which
`ollama ps` reads too); printing only.
"""

import argparse
import json
import urllib.error
import urllib.request
from datetime import datetime, timezone

from pocketlm.cli.models import format_table
from pocketlm.errors import PocketLMError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ps",
        help="list the models a running server has loaded, their memory, when they unload",
        description="Ask a running `pocketlm serve` which models it holds in memory now.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the server's host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port (default 8000)")
    parser.add_argument(
        "--url", default=None, help="the server's address, e.g. http://127.0.0.1:8000 (instead)"
    )
    parser.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from pocketlm.weights.card import human_bytes  # no torch: cards are not made here

    base = (args.url or f"http://{args.host}:{args.port}").rstrip("/").removesuffix("/v1")
    request = urllib.request.Request(f"{base}/api/ps")
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            models = json.load(answer)["models"]
    except urllib.error.HTTPError as error:
        raise PocketLMError(f"{base} answered {error.code}: {_message(error)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PocketLMError(
            f"no server answers at {base} ({reason}); is `pocketlm serve` running?"
        ) from None
    except (ValueError, KeyError):
        raise PocketLMError(f"{base}/api/ps did not answer as pocketlm serve does") from None
    if not models:
        print("no model is loaded")
        return 0
    rows = [
        [
            m["name"],
            human_bytes(m["size"]),
            "GPU" if m.get("size_vram") else "CPU",
            str(m.get("context_length", "-")),
            until(m.get("expires_at"), m.get("requests", 0)),
        ]
        for m in models
    ]
    print(format_table(["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))
    return 0


def until(expires_at: str | None, requests: int) -> str:
    """When a model unloads: 'in 4 min 59 s', 'answering 2 requests', or 'never'."""
    if requests:
        return f"answering {requests} request{'s' if requests > 1 else ''}"
    if expires_at is None:
        return "never (until the server stops)"
    at = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    seconds = max(0, round((at - datetime.now(timezone.utc)).total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    return f"in {minutes} min {seconds} s" if minutes else f"in {seconds} s"


def _message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.load(error)
    except ValueError:
        return error.reason
    return (
        body.get("error", {}).get("message")
        if isinstance(body.get("error"), dict)
        else body.get("error")
    )
