"""`pocketlm rm NAME`: delete a model from pocketlm's store, and the fine-tune run of the
same name (its checkpoint is about three times the fp32 model). Printing only.

Hub models live in the Hugging Face cache, which `hf cache rm` manages; for those the
error says so instead of touching a cache other programs share.
"""

import argparse
import os
import shutil
import uuid
from pathlib import Path

from pocketlm import paths
from pocketlm.errors import ModelNotFoundError
from pocketlm.weights import catalog, sources, store
from pocketlm.weights.card import human_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rm",
        help="remove a model from pocketlm's store",
        description="Delete a pulled or fine-tuned model (see `pocketlm list`) and the "
        "fine-tune run folder of the same name (checkpoint, metrics, loss plot).",
    )
    parser.add_argument("name", help="model name as `pocketlm list` shows it")
    parser.add_argument(
        "--run-only",
        action="store_true",
        help="keep the model; delete only its fine-tune run folder (no --resume after that)",
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    run = paths.runs_dir() / args.name
    has_run = sources.STORE_NAME.match(args.name) is not None and run.is_dir()
    if args.run_only:
        if not has_run:
            raise ModelNotFoundError(f"no fine-tune run '{args.name}' in {paths.runs_dir()}")
        print(f"removed the run folder {run} ({human_bytes(_remove_tree(run))})")
        return 0
    folder = paths.model_store() / args.name
    linked = folder.is_symlink()  # a model linked in by hand: only the link goes
    size = _size(folder) if folder.is_dir() and not linked else 0
    try:
        store.remove(args.name)
    except ModelNotFoundError as error:
        if has_run:  # a run that never exported a model (stopped, failed) is still a run
            print(f"removed the run folder {run} ({human_bytes(_remove_tree(run))})")
            return 0
        entry = catalog.lookup(args.name)
        repo_id = entry.repo_id if entry else args.name
        if repo_id and sources.REPO_ID.match(repo_id):
            raise ModelNotFoundError(
                f"'{args.name}' is not in pocketlm's store; hub models live in the Hugging "
                f"Face cache: remove it with `hf cache rm model/{repo_id}`"
            ) from error
        raise
    freed = f"removed {args.name} " + (
        "(a link: the files it named are kept)" if linked else f"({human_bytes(size)})"
    )
    if has_run:
        freed += f" and its run folder {run} ({human_bytes(_remove_tree(run))})"
    print(freed)
    return 0


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _remove_tree(folder: Path) -> int:
    """Delete `folder` (renamed away first, so a crash never leaves half a run); its size."""
    size = _size(folder)
    trash = folder.with_name(f".rm-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, trash)
    shutil.rmtree(trash)
    return size
