"""`pocketlm rm NAME`: delete a model from pocketlm's store. Printing only.

Hub models live in the Hugging Face cache, which `hf cache rm` manages; for those the
error says so instead of touching a cache other programs share.
"""

import argparse

from pocketlm.errors import ModelNotFoundError
from pocketlm.weights import catalog, sources, store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rm",
        help="remove a model from pocketlm's store",
        description="Delete a pulled or fine-tuned model (see `pocketlm list`).",
    )
    parser.add_argument("name", help="model name as `pocketlm list` shows it")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    try:
        store.remove(args.name)
    except ModelNotFoundError as error:
        entry = catalog.lookup(args.name)
        repo_id = entry.repo_id if entry else args.name
        if repo_id and sources.REPO_ID.match(repo_id):
            raise ModelNotFoundError(
                f"'{args.name}' is not in pocketlm's store; hub models live in the Hugging "
                f"Face cache: remove it with `hf cache rm model/{repo_id}`"
            ) from error
        raise
    print(f"removed {args.name}")
    return 0
