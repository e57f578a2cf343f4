"""Structured-output flags of `pocketlm run`: --json-schema FILE, --json, --grammar FILE.

Each becomes the engine's `schema` or `grammar` option (pocketlm.generate.constraint); the
files are read and the grammar checked here, before the model loads, so a bad file is a
one-line error at once. Also reads a schema file for the interactive `/set schema FILE`.
Printing and files only.
"""

import argparse
import json
from pathlib import Path
from typing import Any

from pocketlm.errors import PocketLMError


def add_structured_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structured output").add_mutually_exclusive_group()
    group.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="the output is JSON valid under the JSON schema in FILE",
    )
    group.add_argument("--json", action="store_true", help="the output is a JSON object")
    group.add_argument(
        "--grammar",
        default=None,
        metavar="FILE",
        help="the output follows the grammar in FILE (GBNF, or Lark with %%json{schema})",
    )


def structured_options(args: argparse.Namespace) -> dict[str, Any]:
    """{"schema": ...} or {"grammar": ...} from the flags (empty without them), checked."""
    from pocketlm.generate.params import grammar_option  # the engine: only once chosen

    if getattr(args, "json", False):
        options: dict[str, Any] = {"schema": {"type": "object"}}
    elif getattr(args, "json_schema", None):
        options = {"schema": read_schema(args.json_schema)}
    elif getattr(args, "grammar", None):
        options = {"grammar": read_text(args.grammar)}
    else:
        return {}
    grammar_option(options.get("schema"), options.get("grammar"))  # a bad one fails now
    return options


def read_schema(path: str) -> dict:
    """A JSON schema file's object; a one-line error naming the file otherwise."""
    try:
        schema = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise PocketLMError(f"{path}: not JSON ({error})") from None
    if not isinstance(schema, dict):
        raise PocketLMError(f"{path}: a JSON schema is a JSON object")
    return schema


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PocketLMError(f"cannot read {path}: {error.strerror or error}") from None
