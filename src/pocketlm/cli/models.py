"""`pocketlm models`: the catalogue of names pocketlm knows, with their published shapes.

Also holds `format_table`, the plain text table the listing commands share. Printing only.
"""

import argparse

from pocketlm.weights import catalog


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model names pocketlm knows (pull or run them by name)",
        description="The catalogue: short names, where each comes from, and its shape.",
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    header = ["NAME", "SOURCE", "PARAMS", "LAYERS", "HEADS", "KV", "WIDTH", "CTX", "LICENSE"]
    rows = [
        [
            entry.name + (" *" if entry.name == catalog.DEFAULT_MODEL else ""),
            entry.source,
            entry.size,
            str(entry.layers),
            str(entry.heads),
            str(entry.kv_heads),
            str(entry.width),
            str(entry.context),
            entry.license,
        ]
        for entry in catalog.entries()
    ]
    print(format_table(header, rows))
    print("\n* the default. Any Hugging Face org/repo id with safetensors works too.")
    return 0


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, no trailing blanks."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
