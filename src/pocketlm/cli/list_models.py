"""`pocketlm list`: the models on this disk, in pocketlm's store and in the HF cache.

Reads configs and file headers only (no weights). Printing only.
"""

import argparse
import sys
from pathlib import Path

from pocketlm.cli.models import format_table
from pocketlm.errors import PocketLMError
from pocketlm.weights import sources, store
from pocketlm.weights.card import describe, human_bytes, human_count


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "list",
        help="list the models on disk (pocketlm's store and the Hugging Face cache)",
        description="Models you can run without downloading: pocketlm's store, plus causal "
        "language models with safetensors in the Hugging Face cache.",
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    rows = [_row(m.name, m.path, "store", m.size_bytes) for m in store.list_models()]
    rows += [_row(repo_id, path, "hf-cache", None) for repo_id, path in sources.cached_hub_models()]
    if not rows:
        print(
            "no models on disk yet: `pocketlm pull smollm2-135m` gets the default", file=sys.stderr
        )
        return 0
    header = ["NAME", "ARCHITECTURE", "PARAMS", "QUANT", "SIZE", "WHERE"]
    print(format_table(header, rows))
    return 0


def _row(name: str, path: Path | None, where: str, size: int | None) -> list[str]:
    if path is None:
        return [name, "incomplete", "-", "-", human_bytes(size or 0), where]
    try:
        card = describe(path, name=name)
    except PocketLMError:
        return [name, "unreadable", "-", "-", human_bytes(size or 0), where]
    architecture = card.architecture + ("" if card.native else " (transformers)")
    size_text = human_bytes(size if size is not None else card.file_size)
    return [name, architecture, human_count(card.parameters), card.quantization, size_text, where]
